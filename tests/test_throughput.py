"""Tests of pfm.throughput: analytic step FLOPs against XLA and a dense mask, peaks, MFU."""

from __future__ import annotations

import dataclasses

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jax_core

from pfm.batch import PackedBatch, TextTokens, VideoTokens
from pfm import models, throughput
from pfm.models import masks

# A small model whose matmuls dominate its elementwise work (width 128), quick to compile.
CONFIG = models.model_config(
  "XS", patch_size=4, depth=2, text_width=64, text_depth=1, text_heads=2)


def random_packed_batch(rng: np.random.Generator, rows: int, length: int, text_length: int,
                        *, max_segments: int = 3, max_frames: int = 4) -> PackedBatch:
  """Metadata of a packed batch: contiguous segments 1..S then padding, frames non-decreasing
  within a segment (several tokens per frame unit), captions packed the same way."""
  seg = np.zeros((rows, length), np.int32)
  frame = np.zeros((rows, length), np.int32)
  text_seg = np.zeros((rows, text_length), np.int32)
  for r in range(rows):
    num = int(rng.integers(1, max_segments + 1))
    video_ends = np.sort(rng.choice(np.arange(1, length), num, replace=False))
    text_ends = np.sort(rng.choice(np.arange(1, text_length), num, replace=False))
    video_start = text_start = 0
    for s in range(num):
      seg[r, video_start:video_ends[s]] = s + 1
      frame[r, video_start:video_ends[s]] = np.sort(
        rng.integers(0, max_frames, video_ends[s] - video_start))
      text_seg[r, text_start:text_ends[s]] = s + 1
      video_start, text_start = video_ends[s], text_ends[s]
  return packed(segment_ids=seg, causal_block=frame, text_segment_ids=text_seg)


def packed(*, segment_ids, causal_block, text_segment_ids) -> PackedBatch:
  """A `PackedBatch` with this metadata (the FLOP count reads nothing else; the rest is zero)."""
  rows, length = segment_ids.shape
  zeros = np.zeros((rows, length), np.int32)
  return PackedBatch(
    clean_end=np.zeros((rows, length, 12), np.float32), clean_start=np.zeros((rows, length, 12),
                                                                              np.float32),
    segment_ids=segment_ids, causal_block=causal_block, positions=np.zeros((rows, length, 2)),
    stage=zeros, is_target=zeros, text_tokens=np.zeros_like(text_segment_ids),
    text_segment_ids=text_segment_ids)


def model_inputs(batch: PackedBatch, config) -> tuple[VideoTokens, TextTokens]:
  rows, length = batch.segment_ids.shape
  text_length = batch.text_segment_ids.shape[1]
  return (
    VideoTokens(tokens=jnp.zeros((rows, length, config.patch_dim)), t=jnp.zeros((rows, length)),
                segment_ids=jnp.asarray(batch.segment_ids),
                causal_block=jnp.asarray(batch.causal_block),
                positions=jnp.zeros((rows, length, 2))),
    TextTokens(segment_ids=jnp.asarray(batch.text_segment_ids),
               t=jnp.zeros((rows, text_length)),
               tokens=jnp.ones((rows, text_length), jnp.int32)))


def jaxpr_dot_flops(jaxpr) -> float:
  """2 * |output| * |contracted dims| summed over every dot_general, nested jaxprs included."""
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contracting, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      total += 2.0 * math.prod(out) * math.prod(lhs[i] for i in contracting)
    repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for sub in jax_core.jaxprs_in_params(eqn.params):
      total += repeat * jaxpr_dot_flops(sub)
  return total


@pytest.mark.parametrize("output_head", models.OUTPUT_HEADS)
def test_dense_count_matches_the_program_and_xla(output_head):
  """The dense count equals the forward's dot_general FLOPs exactly, and XLA's "flops" of the
  compiled forward within 5%: XLA also counts one FLOP per element of elementwise ops (norms,
  softmax, GELU, RoPE, masking), which the analytic count leaves out."""
  config = dataclasses.replace(CONFIG, output_head=output_head)
  batch = random_packed_batch(np.random.default_rng(0), 2, 64, 32)
  # Shapes only: nothing is initialised or run.
  graphdef, params = nnx.split(nnx.eval_shape(lambda: models.build_model(config, nnx.Rngs(0))))
  inputs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        model_inputs(batch, config))

  def forward(params, inputs):
    return nnx.merge(graphdef, params)(*inputs)

  counts = throughput.step_flops(batch, config)
  program = jaxpr_dot_flops(jax.make_jaxpr(forward)(params, inputs).jaxpr)
  assert program == pytest.approx(counts["forward_dense"], rel=1e-9)

  cost = jax.jit(forward).lower(params, inputs).compile().cost_analysis()
  if isinstance(cost, list):  # older jax: one dict per program
    cost = cost[0]
  xla = cost["flops"]
  assert counts["forward_dense"] <= xla <= 1.05 * counts["forward_dense"]
  assert counts["train_dense"] == 3 * counts["forward_dense"]
  assert counts["forward_useful"] < counts["forward_dense"]


def test_allowed_pairs_match_dense_mask():
  rng = np.random.default_rng(1)
  batch = random_packed_batch(rng, 5, 40, 24, max_segments=4, max_frames=5)
  seg = np.concatenate([batch.text_segment_ids, batch.segment_ids], axis=1)
  frames = np.concatenate(
    [np.full(batch.text_segment_ids.shape, masks.TEXT_CAUSAL_BLOCK), batch.causal_block],
    axis=1)
  mask = np.asarray(masks.make_attention_mask(seg, frames, seg, frames))  # [B, 1, L, L]
  np.testing.assert_array_equal(throughput.allowed_pairs(seg, frames), mask.sum(axis=(1, 2, 3)))

  # Unsorted frames and gaps in the segment ids count the same.
  perm = rng.permutation(seg.shape[1])
  shuffled_seg, shuffled_frames = seg[:, perm] * 3, frames[:, perm] * 7
  mask = np.asarray(masks.make_attention_mask(
    shuffled_seg, shuffled_frames, shuffled_seg, shuffled_frames))
  np.testing.assert_array_equal(
    throughput.allowed_pairs(shuffled_seg, shuffled_frames), mask.sum(axis=(1, 2, 3)))
  np.testing.assert_array_equal(
    throughput.allowed_pairs(np.zeros((2, 3)), np.zeros((2, 3))), [0, 0])

  # Video queries onto caption keys, and the attention term assembled from the pairs.
  text_seg, video_seg = batch.text_segment_ids, batch.segment_ids
  cross = np.asarray(masks.make_attention_mask(
    video_seg, np.zeros_like(video_seg), text_seg, np.zeros_like(text_seg)))
  np.testing.assert_array_equal(throughput.cross_pairs(video_seg, text_seg),
                                cross.sum(axis=(1, 2, 3)))
  counts = throughput.step_flops(batch, CONFIG)
  text_mask = np.asarray(masks.make_attention_mask(
    text_seg, np.zeros_like(text_seg), text_seg, np.zeros_like(text_seg)))
  joint = np.asarray(masks.make_attention_mask(seg, frames, seg, frames)).sum()
  expected = 4 * CONFIG.width * (CONFIG.depth * joint - text_mask.sum()) + (
    4 * CONFIG.text_width * CONFIG.text_depth * text_mask.sum())
  assert counts["attention_useful"] == expected


def test_linear_count_by_hand():
  """One video token and one caption token, no padding: the per-token sums written out."""
  config = models.model_config("smoke", patch_size=2, depth=2)
  d, dt, f, p = config.width, config.text_width, config.time_frequency_dim, config.patch_dim
  batch = packed(segment_ids=np.array([[1, 0]]), causal_block=np.zeros((1, 2), np.int32),
                 text_segment_ids=np.array([[1, 0, 0]]))
  counts = throughput.step_flops(batch, config)
  time_mlp = 2 * f * d + 2 * d * d
  block = 2 * d * 6 * d + 3 * 2 * d * d + 2 * d * d + 2 * 2 * d * 4 * d  # mod, QKV, out, MLP
  video = 2 * p * d + time_mlp + 2 * block + 2 * d * 2 * d + 2 * d * p
  encoder = 3 * 2 * dt * dt + 2 * dt * dt + 2 * 2 * dt * 4 * dt
  pre_only = 2 * d * 2 * d + 3 * 2 * d * d
  text = encoder + (2 * dt * d + 2 * d * d) + time_mlp + 2 * dt * d + block + pre_only
  assert counts["linear_useful"] == video + text
  assert counts["linear_dense"] == 2 * video + 3 * text
  assert counts["video_tokens"] == 1 and counts["text_tokens"] == 1
  assert counts["video_slots"] == 2 and counts["text_slots"] == 3


@pytest.mark.parametrize("kind,chip", [
  ("TPU v4", "TPU v4"),
  ("TPU v5 lite", "TPU v5e"),
  ("TPU v5e", "TPU v5e"),
  ("TPU v5", "TPU v5p"),
  ("TPU v5p", "TPU v5p"),
  ("TPU v6 lite", "TPU v6e"),
  ("TPU v6e", "TPU v6e"),
  ("NVIDIA A100-SXM4-80GB", "A100"),
  ("NVIDIA A100-SXM4-40GB", "A100"),
  ("NVIDIA A100-PCIE-40GB", "A100"),
  ("NVIDIA H100 80GB HBM3", "H100 SXM"),
  ("NVIDIA H100 PCIe", "H100 PCIe"),
  ("NVIDIA H200", "H200"),
])
def test_peak_lookup(kind, chip):
  assert throughput.chip_name(kind) == chip
  assert throughput.peak_flops(kind, jnp.bfloat16) == throughput.PEAK_FLOPS[chip]["bfloat16"]
  assert throughput.peak_flops(kind, "float32") == throughput.PEAK_FLOPS[chip]["float32"]


def test_peak_values_and_unknown_devices():
  tflops = {chip: peaks["bfloat16"] / 1e12 for chip, peaks in throughput.PEAK_FLOPS.items()}
  assert tflops == {"TPU v4": 275, "TPU v5e": 197, "TPU v5p": 459, "TPU v6e": 918,
                    "A100": 312, "H100 SXM": 989, "H100 PCIe": 756, "H200": 989}
  assert throughput.peak_flops("NVIDIA H100 80GB HBM3", "float32") == 494.5e12
  for kind in ("cpu", "TPU v4 lite", "NVIDIA H100 NVL", "NVIDIA H200 NVL", "Tesla V100-SXM2"):
    assert throughput.peak_flops(kind) is None
  assert throughput.peak_flops("TPU v4", "float16") is None


def test_mfu_arithmetic():
  rates = throughput.throughput_metrics(
    flops=6e15, tokens=1e6, seconds=2.0, num_devices=8, peak=1e15)
  assert rates == pytest.approx({"tokens_per_sec": 5e5, "tflops_per_device": 375.0, "mfu": 0.375})
  assert "mfu" not in throughput.throughput_metrics(1.0, 1.0, 1.0, 1, None)
  with pytest.raises(ValueError):
    throughput.throughput_metrics(1.0, 1.0, 0.0, 1, 1.0)

  batch = random_packed_batch(np.random.default_rng(2), 2, 32, 16)
  counts = throughput.step_flops(batch, CONFIG)
  meter = throughput.ThroughputMeter(CONFIG, num_devices=2, peak=1e12)
  meter.add(batch)
  meter.add(batch)
  metrics = meter.metrics(4.0)
  assert metrics["throughput/tokens_per_sec"] == pytest.approx(2 * counts["video_tokens"] / 4)
  assert metrics["throughput/tflops_per_device"] == pytest.approx(
    2 * counts["train_useful"] / 4 / 2 / 1e12)
  assert metrics["throughput/mfu"] == pytest.approx(2 * counts["train_useful"] / 4 / 2 / 1e12)
  assert metrics["throughput/dense_tflops_per_device"] == pytest.approx(
    2 * counts["train_dense"] / 4 / 2 / 1e12)
  assert meter.steps == 0 and meter.flops == 0.0  # reset


def test_measure_matmul_flops():
  rate = throughput.measure_matmul_flops(64, repeats=2)
  assert np.isfinite(rate) and rate > 0
  peak, label = throughput.default_peak("float32", device_kind="cpu", matmul_size=64)
  assert label == "measured matmul" and peak > 0
  assert throughput.default_peak("bfloat16", device_kind="TPU v4") == (275e12,
                                                                       "TPU v4 bfloat16 datasheet")


def test_sampling_flops_count_the_video_stream_of_every_step():
  """``pfm.benchmark.sampling_flops`` = sum over stages of steps x the forward FLOPs of the video
  stream on 2 rows (guidance), as ``step_flops`` counts them, plus video-to-caption attention."""
  from configs import vanilla
  from pfm import benchmark
  from pfm import spec as spec_lib
  from pfm.data import layout
  config = vanilla.full_sequence_config("smoke", num_stages=3, spatial=True,
                                        frame_rate_schedule="2")
  spec = spec_lib.resolve(config)
  frames = np.zeros((4, 16, 16, 3), np.float32)
  expected, m, lt = 0.0, spec.model, config.data.caption_length
  for order, k in enumerate(range(2, -1, -1)):
    sample = layout.layout_clip(frames, k, spec.pyramid, config.model.patch_size)
    n = len(sample["stage"])
    video_only = throughput.step_flops(SimpleNamespace(
        segment_ids=np.ones((2, n), np.int32), causal_block=np.zeros((2, n), np.int32),
        text_segment_ids=np.zeros((2, 1), np.int32)), m)
    assert video_only["pooling_useful"] == 0
    expected += spec.steps_per_stage[order] * (
        video_only["forward_useful"] + 2 * 4 * m.width * m.depth * n * lt)
  assert benchmark.sampling_flops(spec, 4) == pytest.approx(expected, rel=1e-9)


def test_stage_profile_splits_the_sampling_time_by_stage():
  """Every pyramid's stages, coarsest first, with the tokens and FLOPs `stage_step_flops` counts
  and a measured time per step."""
  from configs import vanilla
  from pfm import benchmark
  config = vanilla.get_config("smoke")
  result = benchmark.stage_profile(config, total_steps=4, extra_steps=2, repeats=1)
  for name in ("vanilla", *benchmark.PYRAMIDS):
    spec = benchmark._variant(config, *benchmark.PYRAMIDS.get(name, (False, "", "")), 4)
    stages = benchmark.stage_step_flops(spec, config.sample.num_frames)
    assert len(stages) == spec.pyramid.num_stages
    tokens = [result[f"{name}_stage{i}_tokens"] for i in range(len(stages))]
    assert tokens == [n for n, _ in stages] and tokens == sorted(tokens)
    for i, (_, flop) in enumerate(stages):
      assert result[f"{name}_stage{i}_gflop_per_step"] == pytest.approx(flop / 1e9)
      assert result[f"{name}_stage{i}_ms_per_step"] >= 0
    assert result[f"{name}_sample_s"] > 0 and np.isfinite(result[f"{name}_fixed_ms"])
