"""Training throughput: analytic FLOPs of a packed train step, device peaks and MFU.

Model FLOPs follow the PaLM convention (Chowdhery et al., 2022, Appendix B): the matrix
multiplications the model needs for its tokens, and a train step = 3 x forward (the backward pass
of a matmul is two matmuls of the same size). Recomputation (``model.remat_policy``) is not
counted: with "full" remat the device executes about 4 x forward, and MFU stays the same
figure. Non-matmul work (norms, softmax, masking, RoPE, activations, embedding lookups, the
optimizer) is ignored.

Counts are computed on the host from the NumPy packed batch (`pfm.data.pipeline`), vectorised
(about 0.3 ms per batch of 4 rows), so a training loop can call them every step. Two figures:

* ``*_useful``: the work the model needs: linear layers on non-padding tokens, attention only on
  (query, key) pairs the mask allows (`pfm.models.masks`: same non-zero segment and
  frame(key) <= frame(query)), without the text-query rows of the last block (its pre-only text
  stream drops them). This is the numerator of MFU.
* ``*_dense``: what the dense ``"xla"`` attention backend executes: every linear on every token
  slot of the row, padding included, and the full [Lt + L] x [Lt + L] attention in every joint
  block (and [Lt] x [Lt] per text-encoder layer). This equals the sum of 2 m n k over the
  ``dot_general`` operations of the model's forward program. XLA's
  ``compiled.cost_analysis()["flops"]`` is a few per cent larger: it also counts one FLOP per
  output element of elementwise operations (exp, tanh and other transcendentals are counted
  separately, under "transcendentals").

Caption dropout happens on the device after the count: dropped captions count as text.

Peak rates (`PEAK_FLOPS`) are dense (no 2:4 sparsity) per-chip figures from the vendors'
datasheets; on a CPU or an unknown device `measure_matmul_flops` times a large jitted matmul and
that rate stands in for the peak ("measured matmul").

Use in a training loop (host batch as NumPy, step times in seconds)::

  peak, peak_label = default_peak(spec.model.dtype)     # once; measures a matmul on a CPU
  meter = ThroughputMeter(spec.model, num_devices=jax.device_count(), peak=peak)
  ...
  meter.add(batch)                   # every step: the global batch of that step
  ...
  scalars |= meter.metrics(seconds)  # at a log step: wall seconds since the last metrics()
  # -> throughput/tokens_per_sec, throughput/tflops_per_device, throughput/mfu,
  #    throughput/dense_tflops_per_device
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pfm.batch import PackedBatch
from pfm.models import masks
from pfm.models.presets import MMDiTConfig

# Dense (non-sparse) peak matmul rate per chip in FLOP/s, by compute dtype. Sources: Google Cloud
# TPU system architecture pages (v4, v5e, v5p, v6e "Trillium": bf16 per chip), NVIDIA A100
# datasheet (2021), H100 datasheet (2023, SXM5 and PCIe) and H200 datasheet (2024, SXM); NVIDIA
# quotes tensor-core rates "with sparsity", the dense figures below are half of those.
# float32 assumes JAX's DEFAULT matmul precision, under which float32 matmuls run as one bfloat16
# pass on TPU (so the bf16 peak applies) and as TF32 on Ampere/Hopper tensor cores
# (https://docs.jax.dev/en/latest/201/precision.html). With precision="highest" these figures
# are too high (several passes on TPU; plain FP32 on GPU: 19.5 / 67 / 51 TFLOP/s).
PEAK_FLOPS: dict[str, dict[str, float]] = {
  "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
  "TPU v5e": {"bfloat16": 197e12, "float32": 197e12},
  "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
  "TPU v6e": {"bfloat16": 918e12, "float32": 918e12},
  "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
  "H100 SXM": {"bfloat16": 989e12, "float16": 989e12, "float32": 494.5e12},
  "H100 PCIe": {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12},
  "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494.5e12},
}

# `jax.Device.device_kind` (lower-cased) -> key of PEAK_FLOPS; first match wins. Variants with
# other clocks or power limits (TPU v4 lite, H100 NVL, H200 NVL) match nothing: their peak is
# unknown here (None).
_DEVICE_KIND_PATTERNS: tuple[tuple[str, str], ...] = (
  (r"^tpu v4$", "TPU v4"),
  (r"^tpu v5 ?(lite|e)$", "TPU v5e"),
  (r"^tpu v5p?$", "TPU v5p"),
  (r"^tpu v6 ?(lite|e)$", "TPU v6e"),
  (r"\ba100\b", "A100"),
  (r"\bh100\b.*\bpcie\b", "H100 PCIe"),
  (r"\bh100\b(?!.*\bnvl\b)", "H100 SXM"),
  (r"\bh200\b(?!.*\bnvl\b)", "H200"),
)


def chip_name(device_kind: str) -> str | None:
  """The `PEAK_FLOPS` key of a `jax.Device.device_kind` string, e.g. "TPU v5 lite" -> "TPU v5e".

  Returns None for devices not in the table (CPUs, other accelerators).
  """
  kind = device_kind.strip().lower()
  for pattern, name in _DEVICE_KIND_PATTERNS:
    if re.search(pattern, kind):
      return name
  return None


def peak_flops(device_kind: str, dtype: Any = "bfloat16") -> float | None:
  """Dense peak matmul FLOP/s of one chip for the compute dtype, or None when unknown.

  Args:
    device_kind: `jax.devices()[0].device_kind`, e.g. "TPU v4", "TPU v5 lite", "TPU v6 lite",
      "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", "NVIDIA H200".
    dtype: compute dtype (name or dtype): "bfloat16", "float16" or "float32".

  Returns:
    FLOP/s per chip (`PEAK_FLOPS`), or None for an unknown device or a dtype without a figure.
  """
  name = chip_name(device_kind)
  if name is None:
    return None
  return PEAK_FLOPS[name].get(jnp.dtype(dtype).name)


@functools.lru_cache(maxsize=4)
def _compiled_matmul(n: int, dtype_name: str):
  """A compiled n x n x n matmul and its operands on the default device."""
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((n, n)), dtype_name)
  b = jnp.asarray(rng.standard_normal((n, n)), dtype_name)
  matmul = jax.jit(jnp.matmul).lower(a, b).compile()
  matmul(a, b).block_until_ready()
  return matmul, a, b


def measure_matmul_flops(n: int = 2048, dtype: Any = jnp.float32, repeats: int = 10) -> float:
  """Measured FLOP/s of a jitted n x n x n matmul on the default device (best of `repeats`).

  The matmul is compiled and run once before the first measurement (and kept for later calls
  with the same n and dtype); each timed call waits for its result (`block_until_ready`). The
  fastest call estimates the attainable rate; other processes on the machine lower it.

  Args:
    n: matrix side (>= 1).
    dtype: operand dtype.
    repeats: timed calls (>= 1).

  Returns:
    2 n^3 / (fastest call's seconds), FLOP/s.
  """
  matmul, a, b = _compiled_matmul(int(n), jnp.dtype(dtype).name)
  best = math.inf
  for _ in range(max(repeats, 1)):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n**3 / best


def default_peak(dtype: Any = "float32", *, device_kind: str | None = None,
                 matmul_size: int = 2048) -> tuple[float, str]:
  """The peak to compute MFU against: the datasheet figure, else a measured matmul rate.

  Args:
    dtype: compute dtype of the model.
    device_kind: default `jax.devices()[0].device_kind`.
    matmul_size: n of `measure_matmul_flops` when the device is not in `PEAK_FLOPS`.

  Returns:
    (FLOP/s per device, label): label "<chip> <dtype> datasheet" or "measured matmul".
  """
  kind = jax.devices()[0].device_kind if device_kind is None else device_kind
  peak = peak_flops(kind, dtype)
  if peak is not None:
    return peak, f"{chip_name(kind)} {jnp.dtype(dtype).name} datasheet"
  return measure_matmul_flops(matmul_size, dtype), "measured matmul"


def allowed_pairs(segment_ids: np.ndarray, frames: np.ndarray) -> np.ndarray:
  """Per row, the number of (query, key) pairs the attention mask allows, counted from metadata.

  Self-attention with the mask of `pfm.models.masks.make_attention_mask`: segment(q) ==
  segment(k) != 0 and frame(k) <= frame(q). Per row and segment, every query of frame f sees the
  keys of frames <= f: the sum over frames of count(f) * cumulative count(<= f). Vectorised (one
  sort of the tokens), no dense mask.

  Args:
    segment_ids: int [B, L], 0 = padding.
    frames: int [B, L] frame unit of each token (any integers, e.g. -1 for text).

  Returns:
    int64 [B], each in [0, L^2].
  """
  segment_ids = np.asarray(segment_ids, np.int64)
  frames = np.asarray(frames, np.int64)
  rows = segment_ids.shape[0]
  valid = segment_ids != 0
  if not valid.any():
    return np.zeros(rows, np.int64)
  row = np.broadcast_to(np.arange(rows)[:, None], segment_ids.shape)[valid]
  seg, frame = segment_ids[valid], frames[valid]
  frame = frame - frame.min()
  num_frames = int(frame.max()) + 1
  num_segments = int(seg.max()) + 1
  group = row * num_segments + seg                   # (row, segment)
  keys, counts = np.unique(group * num_frames + frame, return_counts=True)  # sorted
  groups = keys // num_frames
  cumulative = np.cumsum(counts)
  # Cumulative count within each (row, segment): subtract the total before the group's start.
  first = np.r_[True, groups[1:] != groups[:-1]]
  before = np.where(first, cumulative - counts, 0)
  before = np.maximum.accumulate(before)
  pairs = counts * (cumulative - before)
  return np.bincount(keys // (num_frames * num_segments), weights=pairs,
                     minlength=rows).astype(np.int64)


def cross_pairs(q_segment_ids: np.ndarray, kv_segment_ids: np.ndarray) -> np.ndarray:
  """Per row, the number of (query, key) pairs in the same non-zero segment (no frame order).

  Args:
    q_segment_ids: int [B, Lq]; kv_segment_ids: int [B, Lk]; 0 = padding.

  Returns:
    int64 [B]: sum over segments s != 0 of count_q(s) * count_k(s).
  """
  q = np.asarray(q_segment_ids, np.int64)
  k = np.asarray(kv_segment_ids, np.int64)
  size = int(max(q.max(initial=0), k.max(initial=0))) + 1
  rows = q.shape[0]

  def counts(ids):
    flat = (np.arange(rows)[:, None] * size + ids).ravel()
    return np.bincount(flat, minlength=rows * size).reshape(rows, size)[:, 1:]

  return (counts(q) * counts(k)).sum(axis=1)


def linear_flops_per_token(config: MMDiTConfig) -> tuple[int, int]:
  """Forward matmul FLOPs of the linear layers per (video token, text token), 2 m n k each."""
  d, dt, f, p = config.width, config.text_width, config.time_frequency_dim, config.patch_dim
  hidden, text_hidden = int(d * config.mlp_ratio), int(dt * config.text_mlp_ratio)
  time_mlp = 2 * (f * d + d * d)                     # TimestepEmbedder: F -> D -> D
  block = 2 * (6 * d * d + 3 * d * d + d * d + 2 * d * hidden)  # modulation, QKV, out, MLP
  pre_only = 2 * (2 * d * d + 3 * d * d)             # modulation (shift, scale) and QKV
  video = (2 * p * d + time_mlp + config.depth * block
           + 2 * (2 * d * d + d * config.output_dim))  # final layer: modulation, linear
  if config.text_depth > 0:                          # byte encoder: QKV, out, MLP per layer
    encoder = config.text_depth * 2 * (4 * dt * dt + 2 * dt * text_hidden)
  else:                                              # projection of precomputed embeddings
    encoder = 2 * config.text_embed_dim * dt
  pooled_in = config.pooled_embed_dim or dt
  text = (encoder + 2 * (pooled_in * d + d * d)      # pooled-caption MLP: Dt (or Ep) -> D -> D
          + time_mlp + 2 * dt * d                    # context embedding: Dt -> D
          + (config.depth - 1) * block + pre_only)
  return video, text


def step_flops(batch: PackedBatch, config: MMDiTConfig) -> dict[str, float]:
  """Analytic matmul FLOPs of the MM-DiT on one packed batch: forward and train step.

  Terms (forward, summed over the rows; each matmul of an [m, k] by a [k, n] is 2 m n k):

  * linear: every dense layer: patch embedding, noise-level and pooled-caption MLPs, context
    embedding, per block the adaLN modulation (6 D outputs, 2 D for the pre-only text stream of
    the last block), Q/K/V, output projection and MLP, the final layer, and the byte text encoder
    (Q/K/V, output, MLP per layer; or the projection of precomputed embeddings when
    ``text_depth == 0``).
  * pooling: the two segment means of caption features (`pfm.models.text.segment_mean`, one
    matmul each: text onto text, pooled text onto video tokens).
  * attention: Q K^T and P V, 2 * 2 * pairs * D per joint block (D = heads * head size), and
    likewise over captions in each text-encoder layer.

  Caption dropout happens on device, after this count: dropped captions still count as text.

  Args:
    batch: packed batch (NumPy or array-likes) with ``segment_ids`` int [B, L] (0 = padding),
      ``causal_block`` int [B, L], ``text_segment_ids`` int [B, Lt] (0 = padding); other fields
      are ignored.
    config: the model's hyper-parameters.

  Returns:
    float FLOP counts (Python floats) for the whole batch: ``linear_useful``, ``linear_dense``,
    ``pooling_useful``, ``pooling_dense``, ``attention_useful``, ``attention_dense``,
    ``forward_useful``, ``forward_dense`` (sums of the three), ``train_useful`` and
    ``train_dense`` (3 x forward: model FLOPs of one train step), and the token counts
    ``video_tokens``, ``text_tokens`` (non-padding), ``video_slots``, ``text_slots`` (B * L,
    B * Lt).
  """
  seg = np.asarray(batch.segment_ids)
  frame = np.asarray(batch.causal_block)
  text_seg = np.asarray(batch.text_segment_ids)
  rows, length = seg.shape
  text_length = text_seg.shape[1]
  d, dt = config.width, config.text_width
  n_video = int(np.count_nonzero(seg))
  n_text = int(np.count_nonzero(text_seg))

  video_linear, text_linear = linear_flops_per_token(config)
  linear_useful = video_linear * n_video + text_linear * n_text
  linear_dense = rows * (video_linear * length + text_linear * text_length)

  text_text = cross_pairs(text_seg, text_seg).sum()          # caption pairs
  video_text = cross_pairs(seg, text_seg).sum()
  pooling_useful = 2 * (dt * text_text + d * video_text)
  pooling_dense = 2 * rows * (dt * text_length**2 + d * length * text_length)

  joint_seg = np.concatenate([text_seg, seg], axis=1)
  joint_frame = np.concatenate(
    [np.full(text_seg.shape, masks.TEXT_CAUSAL_BLOCK, np.int64), np.asarray(frame, np.int64)],
    axis=1)
  joint = allowed_pairs(joint_seg, joint_frame).sum()
  # Joint blocks (the last drops its text-query rows) and text-encoder layers.
  attention_useful = 4 * d * (config.depth * joint - text_text)
  attention_dense = 4 * d * config.depth * rows * (text_length + length) ** 2
  if config.text_depth > 0:
    attention_useful += 4 * dt * config.text_depth * text_text
    attention_dense += 4 * dt * config.text_depth * rows * text_length**2

  out = {
    "linear_useful": linear_useful, "linear_dense": linear_dense,
    "pooling_useful": pooling_useful, "pooling_dense": pooling_dense,
    "attention_useful": attention_useful, "attention_dense": attention_dense}
  out = {name: float(value) for name, value in out.items()}
  for kind in ("useful", "dense"):
    forward = out[f"linear_{kind}"] + out[f"pooling_{kind}"] + out[f"attention_{kind}"]
    out[f"forward_{kind}"] = forward
    out[f"train_{kind}"] = 3.0 * forward
  out.update(video_tokens=float(n_video), text_tokens=float(n_text),
             video_slots=float(rows * length), text_slots=float(rows * text_length))
  return out


def throughput_metrics(flops: float, tokens: float, seconds: float, num_devices: int,
                       peak: float | None) -> dict[str, float]:
  """Rates of `tokens` and `flops` processed in `seconds` by `num_devices` devices.

  Args:
    flops: model FLOPs done in the interval (e.g. summed ``train_useful`` of its steps).
    tokens: tokens processed in the interval (e.g. non-padding video tokens).
    seconds: wall-clock length of the interval, > 0.
    num_devices: devices sharing the work, >= 1.
    peak: peak FLOP/s of one device, or None when unknown.

  Returns:
    ``tokens_per_sec`` (all devices), ``tflops_per_device`` (10^12 FLOP/s per device) and, when
    `peak` is given, ``mfu`` = flops / (seconds * num_devices * peak), a fraction in [0, 1] for
    a correct peak.

  Raises:
    ValueError: if seconds <= 0 or num_devices < 1.
  """
  if not seconds > 0 or num_devices < 1:
    raise ValueError(f"need seconds > 0 and num_devices >= 1, got {seconds}, {num_devices}")
  out = {"tokens_per_sec": tokens / seconds,
         "tflops_per_device": flops / seconds / num_devices / 1e12}
  if peak is not None:
    out["mfu"] = flops / (seconds * num_devices * peak)
  return out


@dataclasses.dataclass
class ThroughputMeter:
  """Accumulates step FLOPs and tokens of host batches; turns them into logged rates.

  Attributes:
    config: the model's hyper-parameters (``RunSpec.model`` of a run, ``pfm.spec``).
    num_devices: devices that process the batches given to `add`: `jax.device_count()` for the
      global batch, `jax.local_device_count()` for this host's part of it.
    peak: peak FLOP/s per device (`default_peak`), or None (then no ``mfu``).
    prefix: prepended to every metric name.
  """

  config: MMDiTConfig
  num_devices: int = 1
  peak: float | None = None
  prefix: str = "throughput/"
  flops: float = dataclasses.field(default=0.0, init=False)        # useful, since the reset
  flops_dense: float = dataclasses.field(default=0.0, init=False)
  tokens: float = dataclasses.field(default=0.0, init=False)       # non-padding video tokens
  steps: int = dataclasses.field(default=0, init=False)

  def add(self, batch: PackedBatch) -> dict[str, float]:
    """Counts one train step on `batch` (packed, NumPy); returns its `step_flops` dict."""
    counts = step_flops(batch, self.config)
    self.flops += counts["train_useful"]
    self.flops_dense += counts["train_dense"]
    self.tokens += counts["video_tokens"]
    self.steps += 1
    return counts

  def metrics(self, seconds: float, *, reset: bool = True) -> dict[str, float]:
    """Rates over the steps added since the last reset.

    Args:
      seconds: wall time of those steps (> 0), e.g. the time between two log points (then data
        loading and logging lower the rates too) or the sum of the step times.
      reset: start a new interval afterwards.

    Returns:
      ``{prefix}tokens_per_sec`` (non-padding video tokens per second, all devices),
      ``{prefix}tflops_per_device`` (model TFLOP/s per device, useful FLOPs), ``{prefix}mfu``
      (when `peak` is set), and ``{prefix}dense_tflops_per_device`` (the FLOPs the dense
      kernels execute, padding and masked pairs included).

    Raises:
      ValueError: if seconds <= 0.
    """
    rates = throughput_metrics(self.flops, self.tokens, seconds, self.num_devices, self.peak)
    rates["dense_tflops_per_device"] = self.flops_dense / seconds / self.num_devices / 1e12
    if reset:
      self.flops = self.flops_dense = self.tokens = 0.0
      self.steps = 0
    return {self.prefix + name: value for name, value in rates.items()}
