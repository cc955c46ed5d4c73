"""Full-sequence mode: layout, objective, attention, configs; each pyramid config trains and samples."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default, vanilla
from pfm import models, objective, train, validation
from pfm.batch import PackedBatch, TextTokens, VideoTokens
from pfm import sample as sample_lib
from pfm import spec as spec_lib
from pfm import state as state_lib
from pfm.data import layout, pipeline
from pfm.pyramid import tokens as tokens_lib
from pfm.pyramid import stages
from tests.test_model import randomize

PYRAMIDS = {
    "temporal": dict(spatial=False, frame_rate_schedule="2"),
    "spatial": dict(spatial=True, frame_rate_schedule=""),
    "spatiotemporal": dict(spatial=True, frame_rate_schedule="2"),
    "temporal_4-2": dict(spatial=False, frame_rate_schedule="4-2"),
}


def _clip(num_frames=8, size=16, seed=0):
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, (num_frames, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("name", list(PYRAMIDS))
def test_layout_clip_cuts_the_stage_levels(name):
  pyramid = stages.make_pyramid(3, **PYRAMIDS[name])
  frames, p = _clip(num_frames=16), 2
  for k in range(3):
    sample = layout.layout_clip(frames, k, pyramid, p)
    clean = pyramid.level(frames, k)
    tk, hk, wk, _ = clean.shape
    n = layout.clip_tokens(16, height=16, width=16, patch_size=p, pyramid=pyramid, k=k)
    assert n == tk * (hk // p) * (wk // p) == sample["clean_end"].shape[0]
    np.testing.assert_allclose(sample["clean_end"], tokens_lib.patchify(clean, p).reshape(n, -1))
    np.testing.assert_allclose(
        sample["clean_start"],
        tokens_lib.patchify(pyramid.clean_start(clean, k), p).reshape(n, -1), atol=1e-6)
    assert np.all(sample["causal_block"] == 0) and np.all(sample["is_target"] == 1)
    per_frame = n // tk
    np.testing.assert_allclose(sample["temporal_positions"].reshape(tk, per_frame)[:, 0],
                               pyramid.temporal_positions(tk, k))


def _packed_row(pyramid, p, stages_in_row, frames):
  """One packed row of several clips (segments 1, 2, ...) at the given stages."""
  samples = [layout.layout_clip(frames, k, pyramid, p) for k in stages_in_row]
  row = {name: np.concatenate([s[name] for s in samples])[None] for name in samples[0]}
  row["segment_ids"] = np.concatenate(
      [np.full(len(s["stage"]), i + 1, np.int32) for i, s in enumerate(samples)])[None]
  return row


@pytest.mark.parametrize("name", list(PYRAMIDS))
def test_packed_start_mean_of_a_clean_prediction(name):
  """The objective's token-wise Up(Down(D̂)) equals the data side's start mean, packed."""
  pyramid = stages.make_pyramid(3, **PYRAMIDS[name])
  p = 2
  row = _packed_row(pyramid, p, [1, 0, 2, 1], _clip(num_frames=16))
  cfg = objective.ObjectiveConfig(windows=pyramid.windows, patch_size=p,
                                  spatial_jump=pyramid.jump(0)[0])
  path = dict(coarsest=(row["stage"] == 2)[..., None],
              temporal_block_offset=jnp.asarray(row["temporal_block_offset"]))
  got = objective.clean_start_tokens(jnp.asarray(row["clean_end"]), path, cfg)
  np.testing.assert_allclose(got, row["clean_start"], atol=1e-6)


@pytest.mark.parametrize("diffusion", ["flow_matching", "ddim"])
@pytest.mark.parametrize("name", ["temporal", "spatiotemporal"])
def test_clean_prediction_gives_the_exact_stage_target(diffusion, name):
  """With D̂ = D, ``to_target`` reproduces the Algorithm 2 target on every packed token."""
  pyramid = stages.make_pyramid(3, diffusion=diffusion, **PYRAMIDS[name])
  p = 2
  row = _packed_row(pyramid, p, [0, 1, 2], _clip())
  batch = dict(row, positions=row["positions"],
               text_tokens=np.array([[1, 5, 1, 6, 1, 7]]),
               text_segment_ids=np.array([[1, 1, 2, 2, 3, 3]]))
  cfg = objective.ObjectiveConfig(windows=pyramid.windows, patch_size=p, caption_dropout=0.0,
                                  diffusion=diffusion, spatial_jump=pyramid.jump(0)[0],
                                  min_noise=1e-6)
  inputs, target, weight, path = objective.corrupt_packed_batch(
      jax.random.key(0), PackedBatch.from_fields(batch), cfg)
  pred = objective.to_target(jnp.asarray(batch["clean_end"]), inputs[0], path, cfg)
  np.testing.assert_allclose(pred, target, rtol=1e-3, atol=2e-3)
  assert float(jnp.sum(weight)) == pytest.approx(1.0, rel=1e-5)
  wrong = objective.to_target(jnp.asarray(batch["clean_end"]) + 0.1, inputs[0], path, cfg)
  assert not np.allclose(wrong, target, atol=1e-2)


def test_full_sequence_attention_is_bidirectional():
  """One unit (causal_block 0 everywhere): an early frame sees a later one; causal units do not."""
  model = randomize(
      models.build_model(models.model_config("smoke", patch_size=2), rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  n, per_frame = 8, 2
  tokens = jnp.asarray(rng.normal(size=(1, n, 12)), jnp.float32)
  common = dict(t=jnp.full((1, n), 0.5), segment_ids=jnp.ones((1, n), jnp.int32),
                positions=jnp.zeros((1, n, 2)),
                temporal_positions=jnp.repeat(jnp.arange(4.0), per_frame)[None])
  text = TextTokens(segment_ids=jnp.ones((1, 2), jnp.int32), t=jnp.ones((1, 2)),
                    tokens=jnp.array([[1, 9]]))
  changed = tokens.at[0, -1].add(1.0)  # the last frame
  for causal_block, sees_later in ((jnp.zeros((1, n), jnp.int32), True),
                                  (jnp.repeat(jnp.arange(4), per_frame)[None], False)):
    a = model(VideoTokens(tokens=tokens, causal_block=causal_block, **common), text)
    b = model(VideoTokens(tokens=changed, causal_block=causal_block, **common), text)
    assert bool(jnp.any(jnp.abs(a[0, 0] - b[0, 0]) > 1e-6)) == sees_later


def test_temporal_positions_drive_rope():
  model = randomize(
      models.build_model(models.model_config("smoke", patch_size=2), rngs=nnx.Rngs(0)))
  n = 4
  video = VideoTokens(tokens=jnp.ones((1, n, 12)), t=jnp.full((1, n), 0.5),
                      segment_ids=jnp.ones((1, n), jnp.int32),
                      causal_block=jnp.zeros((1, n), jnp.int32), positions=jnp.zeros((1, n, 2)))
  text = TextTokens(segment_ids=jnp.ones((1, 2), jnp.int32), t=jnp.ones((1, 2)),
                    tokens=jnp.array([[1, 9]]))
  base = model(video, text)
  np.testing.assert_allclose(model(video.replace(temporal_positions=jnp.zeros((1, n))), text),
                             base, atol=1e-6)
  moved = model(video.replace(temporal_positions=jnp.array([[0.0, 1.0, 2.5, 3.5]])), text)
  assert not np.allclose(moved, base, atol=1e-5)


CONFIGS = ["tpdiff", "pyramid_fullseq", "spatiotemporal"]


def _smoke(name, arg):
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  config.train.num_steps = 3
  config.train.checkpoint_every_steps = 3
  config.train.sample_every_steps = 3
  return config


@pytest.mark.parametrize("arg", ["smoke", "ddim,smoke"])
@pytest.mark.parametrize("name", CONFIGS)
def test_pyramid_configs_train_and_sample(name, arg, tmp_path):
  """Each config's smoke variant trains (finite loss), samples twice its clip length (TPDiff
  Appendix A.6); the first one also writes its training samples and prompt-to-video score."""
  config = _smoke(name, arg)
  in_loop_samples = (name, arg) == (CONFIGS[0], "smoke")
  if not in_loop_samples:
    config.sample.num_videos = 0  # one sampler compilation per test is enough
  validation.validate(config)
  pyramid = spec_lib.resolve(config).pyramid
  assert pyramid.diffusion == ("ddim" if "ddim" in arg else "flow_matching")
  assert pyramid.num_stages == 3
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state["step"]) == 3
  if in_loop_samples:
    assert sorted((tmp_path / "samples").glob("step_*/sample_0.mp4"))
  graphdef, _ = state_lib.abstract_state(spec_lib.resolve(config))
  sampler = sample_lib.Sampler(spec_lib.resolve(config), graphdef, state["ema_params"])
  t = config.data.num_frames
  # Longer than trained (TPDiff Appendix A.6): 2T frames from a T-frame model.
  frames = sampler.generate("a test prompt", num_frames=2 * t, progress=False)
  assert frames.shape == (2 * t, config.data.height, config.data.width, 3)
  assert frames.dtype == np.uint8 and frames.std() > 0


def test_pipeline_full_sequence_batches_with_alignment():
  config = vanilla.full_sequence_config("smoke", num_stages=3, spatial=True,
                                        frame_rate_schedule="2")
  assert config.pyramid.align_noise
  batch = next(iter(pipeline.create_dataset(spec_lib.resolve(config), seed=0)))
  data = config.data
  p = config.model.patch_size
  assert batch.noise.shape == (data.batch_size, data.max_tokens, 3 * p * p)
  assert np.all(batch.causal_block == 0)
  pyramid = spec_lib.resolve(config).pyramid
  valid = batch.segment_ids > 0
  for k in range(3):
    positions = np.unique(batch.temporal_positions[valid & (batch.stage == k)])
    if positions.size:
      tk = data.num_frames // pyramid.temporal_factors[k]
      np.testing.assert_allclose(positions, pyramid.temporal_positions(tk, k))


@pytest.mark.parametrize("field,value,match", [
    ("pyramid.frame_rate_schedule", "2", "config.pyramid.frame_rate_schedule"),
    ("pyramid.diffusion", "ddpm", "config.pyramid.diffusion"),
    ("model.prediction", "epsilon", "config.model.prediction"),
    ("mode", "bidirectional", "config.mode"),
    ("model.output_head", "conv", "config.model.output_head"),
])
def test_autoregressive_config_errors_name_the_field(field, value, match):
  config = default.get_config("smoke")
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match=match):
    validation.validate(config)


@pytest.mark.parametrize("field,value,match", [
    ("data.num_frames", 6, "config.data.num_frames"),
    ("pyramid.frame_rate_schedule", "4-3", "frame_rate_schedule"),
    ("pyramid.partition", "2-1", "partition"),
    ("pyramid.correlation", -0.5, "correlation"),
    ("model.prediction", "velocity", "config.model.prediction"),
    ("data.max_tokens", 32, "config.data.max_tokens"),
])
def test_full_sequence_config_errors_name_the_field(field, value, match):
  config = importlib.import_module("configs.spatiotemporal").get_config("ddim,smoke")
  section, _, name = field.rpartition(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=match):
    validation.validate(config)


def test_unknown_config_variant():
  with pytest.raises(ValueError, match="unknown config variants"):
    importlib.import_module("configs.tpdiff").get_config("ddpm")


def test_alignment_runs_per_host_shard():
  """Each host's pipeline aligns its own batch: re-aligning it finds nothing left to swap."""
  from pfm.data import alignment

  config = vanilla.full_sequence_config("smoke", num_stages=3, spatial=False,
                                        frame_rate_schedule="2")
  config.data.batch_size = 4
  noises = []
  for shard in range(2):
    batch = next(iter(pipeline.create_dataset(spec_lib.resolve(config), seed=0,
                                              shard_index=shard, shard_count=2)))
    noises.append(batch.noise)
    segments = [(b, seg) for b in range(len(batch.segment_ids))
                for seg in np.unique(batch.segment_ids[b]) if seg > 0]
    by_stage = {}
    for b, seg in segments:
      mask = batch.segment_ids[b] == seg
      by_stage.setdefault(int(batch.stage[b][mask][0]), []).append(
          (batch.clean_end[b][mask], batch.noise[b][mask]))
    for members in by_stage.values():
      if len(members) > 1:
        clean = np.stack([c for c, _ in members])
        noise = np.stack([n for _, n in members])
        np.testing.assert_array_equal(alignment.align_noise(clean, noise),
                                      np.arange(len(members)))
  assert not np.allclose(noises[0], noises[1])
