r"""Speed measurements, each a ratio taken in one run on one machine.

  python -m pfm.benchmark --config=configs/vanilla.py --benchmark=pyramids
  python -m pfm.benchmark --config=configs/vanilla.py --benchmark=stage_profile
  python -m pfm.benchmark --config=configs/default.py --benchmark=sample_cache
  python -m pfm.benchmark --config=configs/default.py --benchmark=alignment
  python -m pfm.benchmark --config=configs/default.py --benchmark=throughput
  python -m pfm.benchmark --config=configs/finetune_lora.py --benchmark=lora

``pyramids``: on one model (the config's, randomly perturbed initial weights) and the config's clip
size, the sampling time of each pyramid (temporal = TPDiff, spatial, spatiotemporal; 3 stages)
against vanilla full-rate, full-resolution full-sequence sampling with the same total number of
steps (``--steps``, default 30: 10 per stage, TPDiff's Table 3 setting), and the train-step
time per sample averaged over the stages (each stage's batch unpacked, one clip per row, as TPDiff
trains) against vanilla training.
``stage_profile``: where each pyramid's sampling time goes: per stage, the time of one Euler step
(measured by adding steps to that stage alone), its FLOPs and achieved FLOP/s, and the fixed cost
of a clip outside the steps.
``sample_cache``: seconds to sample ``config.sample.num_frames`` frame units with and without the
caption + history key/value cache (``MMDiT.encode_context`` / ``MMDiT.decode``), on the config's
model with captions conditioned on their own clean level (the setting that allows the cache) and
randomly perturbed initial weights (speed does not depend on training).
``alignment``: milliseconds per ``pfm.data.alignment.align_noise`` call (host CPU, median) for
batches of 4, 8 and 16 of the config's clips and of TPDiff's AnimateDiff latents, with Table A.1's.
``throughput``: the jitted train step of a benchmark-size model (variant ``THROUGHPUT_VARIANT``
unless ``--config.model.variant`` is given) on real packed batches of the config's data: video
tokens per second, model TFLOP/s (``pfm.throughput``), and MFU against a measured matmul rate
(and against the datasheet peak on a known accelerator).
``lora``: LoRA fine-tuning (``pfm.lora``) against full fine-tuning of the config's model on the
same packed batches: trained parameters, checkpoint size on disk, XLA's memory analysis of the
compiled train step and its median time, the two steps timed alternately in one run.
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from pfm import batch as batch_lib
from pfm import checkpointing
from pfm import errors
from pfm import sample as sample_lib
from pfm import spec as spec_lib
from pfm import state as state_lib
from pfm import throughput as throughput_lib
from pfm import train
from pfm import validation
from pfm.data import alignment as alignment_lib
from pfm.data import layout
from pfm.data import pipeline

FLAGS = flags.FLAGS


def sample_cache(config, *, prompt: str = "a benchmark prompt", seed: int = 0) -> dict:
  """Returns ``{"full_s", "cached_s", "speedup"}`` for sampling one video both ways."""
  config = config.copy_and_resolve_references()
  config.model.text_time_conditioning = False
  spec = validation.validate(config)
  graphdef, state = state_lib.init_state(spec)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(p.dtype),
                        state["params"])
  seconds = {}
  for name, cache in (("full_s", False), ("cached_s", True)):
    sampler = sample_lib.Sampler(spec, graphdef, params)
    sampler.caches_context = cache
    sampler.generate(prompt, progress=False)  # compile (shapes depend on num_frames)
    start = time.perf_counter()
    sampler.generate(prompt, progress=False)
    seconds[name] = time.perf_counter() - start
  return seconds | {"speedup": seconds["full_s"] / seconds["cached_s"]}


def alignment(config, *, repeats: int = 20, seed: int = 0) -> dict:
  """Times TPDiff's data-noise alignment (``align_noise``, Algorithm 1) on the host CPU.

  Per batch size B in (4, 8, 16) and per-sample size D in (the config's full-resolution clip,
  ``num_frames * height * width * 3``; TPDiff's AnimateDiff latent, 16 x 4 x 64 x 64 = 262144):
  float32 clean data U[-1, 1] and standard normal noise of shape [B, D]
  (``np.random.default_rng(seed)``), one warm-up call, then the median of ``repeats`` calls.

  Returns:
    ``{"ms_batch{B}_d{D}": ms}`` for each pair, plus the paper's Table A.1 latencies
    ``{"paper_ms_batch4": 5.1, "paper_ms_batch8": 9.6, "paper_ms_batch16": 17.8}`` (their
    hardware and sample size, for reference), all floats.
  """
  data = config.data
  sizes = dict.fromkeys((int(data.num_frames * data.height * data.width * 3), 16 * 4 * 64 * 64))
  rng = np.random.default_rng(seed)
  result = {}
  for size in sizes:
    for batch in (4, 8, 16):
      clean = rng.uniform(-1, 1, (batch, size)).astype(np.float32)
      noise = rng.standard_normal((batch, size), dtype=np.float32)
      alignment_lib.align_noise(clean, noise)  # warm-up
      seconds = []
      for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        alignment_lib.align_noise(clean, noise)
        seconds.append(time.perf_counter() - start)
      result[f"ms_batch{batch}_d{size}"] = 1e3 * float(np.median(seconds))
  return result | {"paper_ms_batch4": 5.1, "paper_ms_batch8": 9.6, "paper_ms_batch16": 17.8}


PYRAMIDS = {  # name -> (spatial, frame-rate schedule, partition)
    "temporal": (False, "2", "1-1-1"),
    "spatial": (True, "", "1-1-1"),
    "spatiotemporal": (True, "2", "1-1-1"),
    "spatiotemporal_2-1-1": (True, "2", "2-1-1"),
}


def _variant(config, spatial: bool, frame_rate_schedule: str, partition: str,
             total_steps: int) -> spec_lib.RunSpec:
  """``config`` as a 3-stage full-sequence pyramid (or 1 stage for ``vanilla``), validated."""
  c = config.copy_and_resolve_references()
  c.mode = "full_sequence"
  c.model.text_time_conditioning = False
  vanilla = not spatial and not frame_rate_schedule
  c.pyramid.num_stages = 1 if vanilla else 3
  c.pyramid.spatial, c.pyramid.frame_rate_schedule = spatial, frame_rate_schedule
  c.pyramid.partition = "" if vanilla else partition
  c.pyramid.stage_weights = (1.0,) * c.pyramid.num_stages
  c.sample.total_steps = total_steps  # split over the stages as the partition splits time
  c.sample.steps_per_stage = ()
  # One clip per row (the rows are not packed here): a row must hold a full-size clip.
  p = c.model.patch_size
  c.data.max_tokens = max(c.data.max_tokens,
                          c.data.num_frames * (c.data.height // p) * (c.data.width // p))
  return validation.validate(c)


def _stage_batch(spec: spec_lib.RunSpec, frames: np.ndarray, k: int,
                 rng: np.random.Generator) -> batch_lib.PackedBatch:
  """``data.batch_size`` rows, each the clip at stage k (one clip per row, as TPDiff trains)."""
  config = spec.config
  data, p = config.data, config.model.patch_size
  sample = layout.layout_clip(frames, k, spec.pyramid, p)
  rows = data.batch_size
  fields = {name: np.broadcast_to(a, (rows, *a.shape)).copy() for name, a in sample.items()}
  return batch_lib.PackedBatch.from_fields(fields | dict(
      segment_ids=np.ones(fields["stage"].shape, np.int32),
      text_tokens=rng.integers(2, 258, (rows, data.caption_length)).astype(np.int32),
      text_segment_ids=np.ones((rows, data.caption_length), np.int32)))


def _train_step_per_sample(spec: spec_lib.RunSpec, graphdef, state, *, repeats: int,
                           seed: int) -> dict[str, float]:
  """Means over stages (weights ``stage_weights``) of one clip's train step: ``seconds``
  (median of ``repeats``, compiled), analytic model ``flop`` (``pfm.throughput.step_flops``)
  and video ``tokens``."""
  pyramid, config = spec.pyramid, spec.config
  data = config.data
  rng = np.random.default_rng(seed)
  frames = rng.uniform(-1, 1, (data.num_frames, data.height, data.width, 3)).astype(np.float32)
  step_fn = train.make_train_step(spec, graphdef)
  weights = np.asarray(config.pyramid.stage_weights, np.float64)
  seconds, flop, tokens = [], [], []
  for k in range(pyramid.num_stages):
    batch = _stage_batch(spec, frames, k, rng)
    rows = batch.segment_ids.shape[0]
    counts = throughput_lib.step_flops(batch, spec.model)
    flop.append(counts["train_useful"] / rows)
    tokens.append(counts["video_tokens"] / rows)
    state_k = jax.tree.map(jnp.copy, state)
    state_k, metrics = step_fn(state_k, batch)  # compile
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      state_k, metrics = step_fn(state_k, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    seconds.append(float(np.median(times)) / rows)
  mean = lambda values: float(np.sum(weights * np.asarray(values)) / weights.sum())
  return {"seconds": mean(seconds), "flop": mean(flop), "tokens": mean(tokens)}


def stage_step_flops(spec: spec_lib.RunSpec, num_frames: int) -> list[tuple[int, float]]:
  """Per stage, coarsest first: (video tokens, analytic model FLOPs of one Euler step).

  One Euler step of stage k runs the video stream of the MM-DiT on the stage's n_k tokens, for
  the prompt and the null caption (classifier-free guidance, 2 rows): its linear layers and its
  attention of n_k queries over n_k video + L_t caption keys. The caption's keys and values are
  computed once per clip (a clean-conditioned caption, ``MMDiT.encode_context``) and not counted.
  """
  config = spec.config
  m, p = spec.model, config.model.patch_size
  video_linear, _ = throughput_lib.linear_flops_per_token(m)
  text = config.data.caption_length
  out = []
  for k in range(spec.pyramid.num_stages - 1, -1, -1):
    t, h, w, _ = spec.pyramid.stage_shape((num_frames, config.data.height, config.data.width, 3),
                                          k)
    n = t * (h // p) * (w // p)
    out.append((n, 2.0 * (video_linear * n + 4 * m.width * m.depth * n * (n + text))))
  return out


def sampling_flops(spec: spec_lib.RunSpec, num_frames: int) -> float:
  """Analytic model FLOPs of sampling one ``num_frames`` clip (full-sequence mode): the sum over
  stages of their steps times `stage_step_flops`."""
  return float(sum(steps * flop for steps, (_, flop) in
                   zip(spec.steps_per_stage, stage_step_flops(spec, num_frames))))


def _seconds(fn, repeats: int, statistic=np.median) -> float:
  """``statistic`` (median) of the wall times of ``repeats`` calls of ``fn()``, after one
  untimed (compiling) call."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(statistic(times))


def _pyramid_variants(config, total_steps: int, seed: int):
  """Vanilla and every `PYRAMIDS` variant of ``config`` (name -> spec), with one model for all:
  its graphdef, initial train state and randomly perturbed parameters (the outputs then depend
  on every weight; speed does not depend on training)."""
  base = _variant(config, False, "", "", total_steps)
  graphdef, state = state_lib.init_state(base)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(p.dtype),
                        state["params"])
  variants = {"vanilla": base} | {
      name: _variant(config, *pyramid, total_steps) for name, pyramid in PYRAMIDS.items()}
  return variants, graphdef, state, params


def stage_profile(config, *, total_steps: int = 30, extra_steps: int = 20, repeats: int = 7,
                  prompt: str = "a benchmark prompt", seed: int = 0) -> dict:
  """Where the sampling time of each pyramid goes: per stage, and outside the Euler steps.

  Sampling is one compiled program per step schedule, so a stage's time per Euler step is
  measured by difference: the clip's sampling time with ``extra_steps`` more steps at that stage
  minus the time with the schedule of ``total_steps``, over ``extra_steps``; each time is the
  fastest of ``repeats`` (the work is fixed, so the fastest is the least disturbed). What the
  steps do not explain (the time of the schedule minus the sum of steps x time per step) is the
  fixed cost of a clip: the initial noise, the caption's keys and values, the jumps between
  stages (upsampling, renoising) and the transfer to the host.

  Returns:
    For ``vanilla`` and each name of ``PYRAMIDS``, per stage i (coarsest first):
    ``<name>_stage<i>_tokens``, ``<name>_stage<i>_gflop_per_step`` (`stage_step_flops`),
    ``<name>_stage<i>_ms_per_step``, ``<name>_stage<i>_tflops`` (achieved) and
    ``<name>_stage<i>_time_share`` (the stage's steps' share of the clip's time); and
    ``<name>_sample_s`` (the clip, fastest of ``repeats``), ``<name>_fixed_ms`` (what the steps
    do not explain, as exact as the timing: a few ms); ``matmul_tflops`` of a float32 2048^3
    matmul in the same run.
  """
  variants, graphdef, _, params = _pyramid_variants(config, total_steps, seed)
  result = {}
  for name, c in variants.items():
    sampler = sample_lib.Sampler(c, graphdef, params)
    steps = tuple(c.steps_per_stage)

    def clip_seconds(schedule):
      return _seconds(lambda: sampler.generate(
          prompt, first_frame_steps=schedule, progress=False), repeats, np.min)

    total = clip_seconds(steps)
    stages = stage_step_flops(c, c.config.sample.num_frames)
    explained = 0.0
    for i, (tokens, flop) in enumerate(stages):
      more = tuple(n + extra_steps * (j == i) for j, n in enumerate(steps))
      per_step = max(clip_seconds(more) - total, 0.0) / extra_steps
      explained += steps[i] * per_step
      result |= {f"{name}_stage{i}_tokens": tokens,
                 f"{name}_stage{i}_gflop_per_step": flop / 1e9,
                 f"{name}_stage{i}_ms_per_step": 1e3 * per_step,
                 f"{name}_stage{i}_tflops": flop / 1e12 / per_step if per_step else float("nan"),
                 f"{name}_stage{i}_time_share": steps[i] * per_step / total}
    result |= {f"{name}_sample_s": total, f"{name}_fixed_ms": 1e3 * (total - explained)}
  result["matmul_tflops"] = throughput_lib.measure_matmul_flops() / 1e12
  return result


def pyramids(config, *, total_steps: int = 30, repeats: int = 3, train_repeats: int = 5,
             prompt: str = "a benchmark prompt", seed: int = 0) -> dict:
  """Sampling and train-step speedups of each pyramid over vanilla full-sequence diffusion.

  Returns:
    For ``vanilla`` and each name of ``PYRAMIDS``: ``<name>_sample_s`` (seconds to sample one
    clip of ``config.sample.num_frames`` frames, median of ``repeats``, compiled, with
    classifier-free guidance), ``<name>_sample_gflop`` (`sampling_flops`),
    ``<name>_sample_tflops`` (achieved), ``<name>_train_ms``, ``<name>_train_gflop`` and
    ``<name>_train_tokens`` (one clip's train step: milliseconds, analytic model GFLOP and video
    tokens, means over the stages), ``<name>_train_tflops``; for the pyramids also
    ``<name>_{sample,train}_speedup`` (measured, vanilla time over the pyramid's) and
    ``<name>_{sample,train}_flop_ratio`` (analytic, vanilla FLOPs over the pyramid's); and
    ``matmul_tflops``, a float32 2048^3 matmul's rate measured in the same run.
  """
  variants, graphdef, state, params = _pyramid_variants(config, total_steps, seed)
  result = {}
  for name, c in variants.items():
    sampler = sample_lib.Sampler(c, graphdef, params)
    result[f"{name}_sample_s"] = _seconds(
        lambda: sampler.generate(prompt, progress=False), repeats)
    result[f"{name}_sample_gflop"] = sampling_flops(c, c.config.sample.num_frames) / 1e9
    result[f"{name}_sample_tflops"] = (
        result[f"{name}_sample_gflop"] / 1e3 / result[f"{name}_sample_s"])
    step = _train_step_per_sample(c, graphdef, state, repeats=train_repeats, seed=seed)
    result[f"{name}_train_ms"] = 1e3 * step["seconds"]
    result[f"{name}_train_gflop"] = step["flop"] / 1e9
    result[f"{name}_train_tokens"] = step["tokens"]
    result[f"{name}_train_tflops"] = step["flop"] / 1e12 / step["seconds"]
  for name in PYRAMIDS:
    for kind, unit in (("sample", "s"), ("train", "ms")):
      result[f"{name}_{kind}_speedup"] = (result[f"vanilla_{kind}_{unit}"]
                                          / result[f"{name}_{kind}_{unit}"])
      result[f"{name}_{kind}_flop_ratio"] = (result[f"vanilla_{kind}_gflop"]
                                             / result[f"{name}_{kind}_gflop"])
  result["matmul_tflops"] = throughput_lib.measure_matmul_flops() / 1e12
  return result


# The model `throughput` measures when the command line does not name one: width 512, 12 blocks.
# The default config's "XS" (width 128) has matmuls too small to say much about utilisation.
THROUGHPUT_VARIANT = "B"


def throughput(config, *, variant: str | None = THROUGHPUT_VARIANT, steps: int = 5,
               seed: int = 0, matmul_size: int = 2048) -> dict:
  """Train-step throughput, model FLOP/s and MFU on real packed batches.

  The config's data pipeline (``pfm.data.pipeline.create_dataset``, ``seed``) provides
  ``steps + 1`` packed batches, fetched before timing so data time is not counted. The jitted
  ``pfm.train`` step is compiled, run once on the first batch, then timed on each of the other
  ``steps`` batches (wall clock to ``block_until_ready``), on one device. FLOPs are
  ``pfm.throughput.step_flops`` per batch. The reference rate is the best of
  ``pfm.throughput.measure_matmul_flops(matmul_size, repeats=3)`` (model compute dtype) sampled
  before the first timed step and after each one. Utilisations compare the fastest step's rate
  with that best matmul rate: on a machine shared with other processes both are the least
  disturbed samples (``matmul_spread`` shows how disturbed the samples were); on an idle machine
  best and typical agree.

  Args:
    config: run config; its model variant is replaced by ``variant`` unless that is None.
    steps: timed train steps (>= 1).
    seed: data pipeline seed.
    matmul_size: side of the reference matmul.

  Returns:
    ``variant`` (str) and floats: ``params_millions``; ``compile_s``; ``step_s`` (median) and
    ``step_best_s``; ``tokens_per_sec`` (non-padding video tokens, timed tokens / timed seconds);
    ``model_tflops_per_device`` (useful train FLOPs: 3 x forward, padding and masked attention
    pairs excluded) and ``dense_tflops_per_device`` (what the dense kernels execute), both
    timed FLOPs / timed seconds; ``matmul_tflops`` (best sample) and ``matmul_spread`` (best /
    worst sample); ``mfu_vs_matmul`` and ``dense_vs_matmul`` (the fastest step's model and
    dense FLOP/s over ``matmul_tflops``);
    ``peak_tflops`` and ``mfu`` when the device has a datasheet peak;
    ``attention_useful_share`` (useful / dense attention FLOPs), ``attention_dense_share``
    (attention / all dense FLOPs); ``video_padding``, ``text_padding`` (fractions of slots).
  """
  config = config.copy_and_resolve_references()
  if variant is not None:
    config.model.variant = variant
  spec = validation.validate(config)
  model_config = spec.model
  data_iter = iter(pipeline.create_dataset(spec, seed=seed))
  batches = [next(data_iter) for _ in range(max(steps, 1) + 1)]
  graphdef, state = state_lib.init_state(spec)
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  start = time.perf_counter()
  step_fn = train.make_train_step(spec, graphdef).lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - start
  state, metrics = step_fn(state, batches[0])  # warm-up
  jax.block_until_ready(metrics)

  def matmul_rate():
    return throughput_lib.measure_matmul_flops(matmul_size, model_config.dtype, repeats=3)

  times, counts, matmul_rates = [], [], [matmul_rate()]
  for batch in batches[1:]:
    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
    counts.append(throughput_lib.step_flops(batch, model_config))
    matmul_rates.append(matmul_rate())
  total = {name: sum(c[name] for c in counts) for name in counts[0]}
  seconds = float(np.sum(times))
  matmul = max(matmul_rates)
  model = throughput_lib.throughput_metrics(
      total["train_useful"], total["video_tokens"], seconds, 1, None)
  dense = throughput_lib.throughput_metrics(total["train_dense"], 0.0, seconds, 1, None)
  fastest = int(np.argmin(times))  # same shapes every step: the same dense FLOPs
  best = {kind: counts[fastest][f"train_{kind}"] / times[fastest] / matmul
          for kind in ("useful", "dense")}
  result = {
      "variant": config.model.variant,
      "params_millions": params / 1e6,
      "compile_s": compile_s,
      "step_s": float(np.median(times)),
      "step_best_s": times[fastest],
      "tokens_per_sec": model["tokens_per_sec"],
      "model_tflops_per_device": model["tflops_per_device"],
      "dense_tflops_per_device": dense["tflops_per_device"],
      "matmul_tflops": matmul / 1e12,
      "matmul_spread": max(matmul_rates) / min(matmul_rates),
      "mfu_vs_matmul": best["useful"],
      "dense_vs_matmul": best["dense"],
  }
  peak = throughput_lib.peak_flops(jax.devices()[0].device_kind, model_config.dtype)
  if peak is not None:
    result |= {"peak_tflops": peak / 1e12, "mfu": total["train_useful"] / seconds / peak}
  return result | {
      "attention_useful_share": total["attention_useful"] / total["attention_dense"],
      "attention_dense_share": total["attention_dense"] / total["forward_dense"],
      "video_padding": 1.0 - total["video_tokens"] / total["video_slots"],
      "text_padding": 1.0 - total["text_tokens"] / total["text_slots"],
  }


def sampling_memory(config, *, guidance: bool = True) -> dict:
  """Compiles, without running it, the MM-DiT call of one sampling step at the config's size
  (``jax.jit(...).lower(...).compile()`` on abstract parameters: nothing is allocated), for the
  worst-case frame unit (the last of ``sample.num_frames`` at full size, with its compressed
  history), rows for the prompt and the null caption (``guidance``), and reports XLA's memory
  analysis. For sizes no machine here can run, e.g. ``configs/pyramid_flow_384p.py``.

  Returns:
    ``params_billions``, ``video_tokens``, ``text_tokens``, ``compile_s`` and XLA's
    ``argument_gib``, ``output_gib``, ``temp_gib`` (activations and scratch) and ``total_gib``
    (their sum, less aliased bytes).
  """
  spec = validation.validate(config.copy_and_resolve_references())
  c = spec.config
  graphdef, abstract = state_lib.abstract_state(spec)
  params = abstract["ema_params"]
  height, width, channels = spec.frame_shape
  tokens = layout.max_tokens_per_sample(
      c.sample.num_frames, height=height, width=width, patch_size=c.model.patch_size,
      num_stages=spec.num_stages, compress_history=c.pyramid.compress_history)
  tokens = -(-tokens // 64) * 64  # the sampler's padded length
  rows = 2 if guidance else 1
  text_len = c.text.max_length if c.text.encoder != "byte" else c.data.caption_length
  f32 = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
  video = batch_lib.VideoTokens(
      tokens=f32(rows, tokens, spec.model.patch_dim), t=f32(rows, tokens),
      segment_ids=f32(rows, tokens, dtype=jnp.int32), causal_block=f32(rows, tokens,
                                                                       dtype=jnp.int32),
      positions=f32(rows, tokens, 2))
  text = batch_lib.TextTokens(
      segment_ids=f32(rows, text_len, dtype=jnp.int32), t=f32(rows, text_len),
      tokens=None if spec.model.text_embed_dim else f32(rows, text_len, dtype=jnp.int32),
      embeddings=f32(rows, text_len, spec.model.text_embed_dim) if spec.model.text_embed_dim
      else None,
      pooled=f32(rows, text_len, spec.model.pooled_embed_dim) if spec.model.pooled_embed_dim
      else None)
  start = time.perf_counter()
  compiled = jax.jit(lambda p, v, t: nnx.merge(graphdef, p)(v, t)).lower(
      params, video, text).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  gib = 2.0**30
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
           + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return {
      "params_billions": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) / 1e9,
      "video_tokens": tokens, "text_tokens": text_len, "compile_s": compile_s,
      "argument_gib": memory.argument_size_in_bytes / gib,
      "output_gib": memory.output_size_in_bytes / gib,
      "temp_gib": memory.temp_size_in_bytes / gib, "total_gib": total / gib,
  }


def _folder_bytes(folder: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(folder)
             for f in names)


def lora(config, *, rank: int = 8, steps: int = 10, seed: int = 0) -> dict:
  """LoRA against full fine-tuning of one model on the same packed batches, in one run.

  Both runs are the config's (its model, optimizer, batches: ``pfm.data.pipeline``, ``seed``);
  the full one trains every weight (``train.lora.rank = 0``), the LoRA one the adapters of
  ``train.lora`` (its rank, or ``rank`` when the config's is 0) on frozen base weights: the
  full run's randomly perturbed initial weights (speed does not depend on training). Each train
  step (``pfm.train.make_train_step``) is compiled, run once, then the two are timed alternately
  on ``steps`` batches (wall clock to ``block_until_ready``, median), so a machine shared with
  other processes slows both alike. The checkpoint is the train state a run saves
  (``pfm.checkpointing.Checkpointer``, the ``state`` item: parameters, AdamW moments, EMA),
  written to a temporary folder; a LoRA checkpoint holds no base weights.

  Returns:
    for ``full`` and ``lora``: ``*_trained_params`` (millions), ``*_checkpoint_mib``,
    ``*_compile_s``, ``*_step_s``, XLA's ``*_argument_mib`` (state, batch and base weights) and
    ``*_temp_mib`` (activations and scratch); ``base_params`` (millions, frozen by LoRA),
    ``rank``, ``lora_param_fraction``, ``checkpoint_ratio`` (full / LoRA) and ``step_speedup``
    (full step time / LoRA step time).
  """
  config = config.copy_and_resolve_references()
  if config.train.lora.rank == 0:
    config.train.lora.rank = rank
  # The base weights are random here: init_from is not read, only required by validation.
  config.train.init_from = config.train.init_from or "(benchmark: random base weights)"
  lora_spec = validation.validate(config)
  full_config = config.copy_and_resolve_references()
  full_config.train.lora.rank = 0
  full_config.train.init_from = ""
  full_spec = validation.validate(full_config)
  data_iter = iter(pipeline.create_dataset(full_spec, seed=seed))
  batches = [next(data_iter) for _ in range(max(steps, 1) + 1)]

  full_graphdef, full_state = state_lib.init_state(full_spec)
  rng = np.random.default_rng(seed)
  base = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(p.dtype),
                      full_state["params"])
  # The full step donates its state: it trains copies of the base weights.
  full_state = dict(full_state, params=jax.tree.map(jnp.copy, base),
                    ema_params=jax.tree.map(jnp.copy, base))
  lora_graphdef, lora_state = state_lib.init_state(lora_spec)
  runs = {"full": (full_spec, full_graphdef, full_state, ()),
          "lora": (lora_spec, lora_graphdef, lora_state, (base,))}
  result = {"rank": str(lora_spec.lora.rank),
            "base_params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(base)) / 1e6}
  step_fns, states = {}, {}
  for name, (spec, graphdef, state, frozen) in runs.items():
    result[f"{name}_trained_params"] = sum(
        int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"])) / 1e6
    with tempfile.TemporaryDirectory() as folder:
      checkpointer = checkpointing.Checkpointer(folder, async_save=False)
      checkpointer.save(0, state, force=True)
      checkpointer.close()
      result[f"{name}_checkpoint_mib"] = _folder_bytes(os.path.join(folder, "0", "state")) / 2**20
    start = time.perf_counter()
    compiled = train.make_train_step(spec, graphdef).lower(state, batches[0], *frozen).compile()
    result[f"{name}_compile_s"] = time.perf_counter() - start
    memory = compiled.memory_analysis()
    result[f"{name}_argument_mib"] = memory.argument_size_in_bytes / 2**20
    result[f"{name}_temp_mib"] = memory.temp_size_in_bytes / 2**20
    state, metrics = compiled(state, batches[0], *frozen)  # warm-up
    jax.block_until_ready(metrics)
    step_fns[name], states[name] = compiled, state
  times = {name: [] for name in runs}
  for batch in batches[1:]:
    for name, (_, _, _, frozen) in runs.items():
      start = time.perf_counter()
      states[name], metrics = step_fns[name](states[name], batch, *frozen)
      jax.block_until_ready(metrics)
      times[name].append(time.perf_counter() - start)
  for name in runs:
    result[f"{name}_step_s"] = float(np.median(times[name]))
  return result | {
      "lora_param_fraction": result["lora_trained_params"] / result["full_trained_params"],
      "checkpoint_ratio": result["full_checkpoint_mib"] / result["lora_checkpoint_mib"],
      "step_speedup": result["full_step_s"] / result["lora_step_s"],
  }


BENCHMARKS = {"pyramids": pyramids, "stage_profile": stage_profile,
              "sample_cache": sample_cache, "alignment": alignment,
              "throughput": throughput, "sampling_memory": sampling_memory, "lora": lora}


def _format(value) -> str:
  """Floats with 3 decimals (3 significant digits below 0.1), anything else as is."""
  if isinstance(value, str):
    return value
  if value and abs(value) < 0.1:
    return f"{value:.3g}"
  return f"{value:.3f}"


def main(argv):
  del argv
  errors.quiet_library_tracebacks()
  kwargs = {}
  if (FLAGS.benchmark == "throughput"
      and "model.variant" in config_flags.get_override_values(FLAGS["config"])):
    kwargs["variant"] = None  # the command line names the model
  result = BENCHMARKS[FLAGS.benchmark](FLAGS.config, **kwargs)
  print(f"{FLAGS.benchmark} on {jax.devices()[0].device_kind}:")
  for name, value in result.items():
    print(f"  {name:>32}: {_format(value)}")


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=False)
  flags.DEFINE_enum("benchmark", "sample_cache", list(BENCHMARKS), "What to measure.")
  flags.mark_flags_as_required(["config"])
  app.run(errors.exit_on_user_error(main, "pfm.benchmark"))
