"""End to end on the smoke config: train, kill and resume, non-finite stop, sample, validation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import default
from pfm import checkpointing, train, validation
from pfm import sample as sample_lib
from pfm import spec as spec_lib
from pfm import state as state_lib
from pfm.data import video as video_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(**train_overrides):
  config = default.get_config("smoke")
  config.sample.num_videos = 0  # sampling is tested separately
  for name, value in train_overrides.items():
    config.train[name] = value
  return config


def final_params(config, workdir, step=None):
  _, abstract = state_lib.abstract_state(spec_lib.resolve(config))
  state, _ = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")).restore(
      abstract, step=step)
  return state


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """12 smoke steps in one go (checkpoints every 2 steps)."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  config = smoke_config(checkpoint_every_steps=2)
  train.train_and_evaluate(config, workdir)
  return config, workdir


def test_killed_run_resumes_to_identical_parameters(uninterrupted, tmp_path):
  config, reference_dir = uninterrupted
  workdir = str(tmp_path / "killed")
  # The killed run is told to go on for much longer (the constant learning rate after warm-up
  # does not depend on num_steps), so the kill always lands mid-run.
  cmd = [sys.executable, "-m", "pfm.train", "--config=configs/default.py:smoke",
         f"--workdir={workdir}", "--config.sample.num_videos=0",
         "--config.train.checkpoint_every_steps=2", "--config.train.num_steps=100000"]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = os.path.join(workdir, "checkpoints", "4", "state", "commit_success.txt")
  deadline = time.time() + 240
  while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.exists(ckpt), "the run never reached its step-4 checkpoint"
  resumed_from = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step
  assert resumed_from is not None and resumed_from < 12
  train.train_and_evaluate(config, workdir)  # restart with the same workdir
  a, b = final_params(config, reference_dir), final_params(config, workdir)
  assert int(a["step"]) == int(b["step"]) == 12
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The training compute continues from the checkpoint: the same FLOPs at the end (the same
  # batches), and no fewer seconds than the resumed part took.
  from pfm import results
  ref, got = results.read_scalars(reference_dir), results.read_scalars(workdir)
  flops = {d: dict(zip(*[x.tolist() for x in s["compute/train_pflop"]])) for d, s in
           (("ref", ref), ("got", got))}
  assert flops["got"][12] == pytest.approx(flops["ref"][12], rel=1e-9)
  steps, seconds = got["compute/train_seconds"]
  assert seconds[steps == 12][-1] > seconds[steps == resumed_from + 2][-1] > 0


@pytest.mark.parametrize("scan_layers,remat_policy", [(False, "none"), (True, "dots")])
def test_train_step_compiles_once_for_all_stages(scan_layers, remat_policy):
  config = smoke_config()
  config.model.scan_layers = scan_layers
  config.model.remat_policy = remat_policy
  from pfm.data import pipeline
  graphdef, state = state_lib.init_state(spec_lib.resolve(config))
  step_fn = train.make_train_step(spec_lib.resolve(config), graphdef)
  data = iter(pipeline.create_dataset(spec_lib.resolve(config), seed=0))
  stages = set()
  for _ in range(6):
    batch = next(data)
    stages |= set(np.unique(batch.stage[batch.segment_ids > 0]).tolist())
    state, _ = step_fn(state, batch)
  assert stages == {0, 1, 2}
  assert step_fn._cache_size() == 1


def test_gradient_accumulation_equals_the_large_batch():
  """m microbatches of B/m rows give the B-row loss and gradient (float32 summation order)."""
  import functools

  from pfm.data import pipeline
  config = smoke_config()
  config.data.batch_size = 4
  graphdef, state = state_lib.init_state(spec_lib.resolve(config))
  batch = next(iter(pipeline.create_dataset(spec_lib.resolve(config), seed=3)))
  key = jax.random.key(7)
  results = {}
  for m in (1, 2, 4):
    fn = jax.jit(functools.partial(train.loss_and_grads, graphdef=graphdef,
                                   obj=spec_lib.resolve(config).objective, microbatches=m))
    loss, err, weight, grads = fn(state["params"], batch, key)
    results[m] = (float(loss), np.asarray(err), [np.asarray(g) for g in jax.tree.leaves(grads)])
  loss1, err1, grads1 = results[1]
  scale = max(np.max(np.abs(g)) for g in grads1)
  assert scale > 0
  for m in (2, 4):
    loss, err, grads = results[m]
    assert abs(loss - loss1) <= 1e-6 * abs(loss1)
    np.testing.assert_allclose(err, err1, rtol=1e-5, atol=1e-7)
    assert max(np.max(np.abs(g - h)) for g, h in zip(grads, grads1)) <= 1e-5 * scale
  # A different batch gives a different gradient: the comparison above is not vacuous.
  other = jax.tree.map(lambda x: x[::-1].copy(), batch)
  fn = jax.jit(functools.partial(train.loss_and_grads, graphdef=graphdef,
                                 obj=spec_lib.resolve(config).objective, microbatches=2))
  _, _, _, grads_other = fn(state["params"], other, jax.random.key(8))
  assert max(np.max(np.abs(np.asarray(g) - h))
             for g, h in zip(jax.tree.leaves(grads_other), grads1)) > 1e-3 * scale


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(uninterrupted, tmp_path):
  config, reference_dir = uninterrupted
  workdir = str(tmp_path / "nan")
  good = smoke_config(num_steps=6, checkpoint_every_steps=6)
  train.train_and_evaluate(good, workdir)
  bad = smoke_config(checkpoint_every_steps=2)
  bad.optimizer.learning_rate = 1e30
  with pytest.raises(train.NonFiniteLossError, match="last good checkpoint is step 6"):
    train.train_and_evaluate(bad, workdir)
  ckpts = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ckpts.latest_step == 6
  state = final_params(config, workdir)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state["params"]))


def test_sampler_text_and_image_to_video(uninterrupted, tmp_path):
  _, workdir = uninterrupted
  sampler = sample_lib.Sampler.from_workdir(workdir)
  ema = final_params(sampler.config, workdir)["ema_params"]
  for x, y in zip(jax.tree.leaves(ema), jax.tree.leaves(sampler._params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # only the EMA is read
  frames = sampler.generate("a young man in a tuxedo", num_frames=3, progress=False)
  assert frames.shape == (3, 32, 32, 3) and frames.dtype == np.uint8
  again = sampler.generate("a young man in a tuxedo", num_frames=3, progress=False)
  np.testing.assert_array_equal(frames, again)  # same seed, same video
  first = np.zeros((48, 64, 3), np.uint8)
  first[:, :, 0] = 200
  video = sampler.generate("a red frame", num_frames=2, image=first, progress=False)
  assert video.shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(video[0], video_lib.fit_frame(first, 32, 32))
  # Longer than the training clips (4 units): the history keeps growing at the lowest level.
  assert sampler.generate("x", num_frames=6, progress=False).shape[0] == 6


def test_sample_command_writes_an_mp4(uninterrupted, tmp_path):
  _, workdir = uninterrupted
  out = str(tmp_path / "out.mp4")
  subprocess.run(
      [sys.executable, "-m", "pfm.sample", f"--workdir={workdir}", "--prompt=a rabbit",
       "--num_frames=3", "--first_frame_steps=1,1,1", "--later_frame_steps=1,1,1",
       f"--output={out}"], cwd=REPO, check=True, capture_output=True)
  assert video_lib.read_frames(out).shape == (3, 32, 32, 3)


@pytest.mark.parametrize("section, field, value, message", [
    ("data", "height", 40, "config.data.height=40 is not divisible"),
    ("pyramid", "partition", "1-1", "config.pyramid .*partition '1-1' needs 3 parts"),
    ("pyramid", "stage_weights", (1.0, 1.0), "config.pyramid.stage_weights"),
    ("data", "max_tokens", 64, "config.data.max_tokens=64 is too small"),
    ("model", "variant", "XXL", "config.model.variant"),
    ("sample", "first_frame_steps", (2, 2), "config.sample.first_frame_steps"),
])
def test_invalid_config_fails_before_compilation(tmp_path, section, field, value, message):
  config = smoke_config()
  config[section][field] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


def _perturbed_sampler_inputs(config, scale):
  graphdef, state = state_lib.init_state(spec_lib.resolve(config))
  rng = np.random.default_rng(0)  # move off the zero init so the output depends on everything
  params = jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape).astype(p.dtype),
                        state["params"])
  return graphdef, params


def test_sampler_history_ablations_change_what_a_unit_sees():
  """Bidirectional attention (Fig. 11) recomputes the history at every step (its keys depend on
  the unit being generated, so no cache); a full-resolution history (Fig. 8) has more tokens.
  Both change the later units and neither the first (which has no history)."""
  kwargs = dict(num_frames=3, first_frame_steps=(2, 2, 2), later_frame_steps=(2, 1, 1),
                seed=3, progress=False)
  config = smoke_config()
  graphdef, params = _perturbed_sampler_inputs(config, 0.3)
  videos = {}
  for name, field, value in (("causal", None, None),
                             ("bidirectional", "model.blockwise_causal", False),
                             ("full_history", "pyramid.compress_history", False)):
    c = smoke_config()
    if field:
      section, key = field.split(".")
      c[section][key] = value
    sampler = sample_lib.Sampler(spec_lib.resolve(c), graphdef, params)
    videos[name] = sampler.generate("a rabbit", **kwargs).astype(int)
    if name == "bidirectional":  # the same video when the sampler is told not to cache
      sampler.caches_context = False
      again = sampler.generate("a rabbit", **kwargs).astype(int)
      assert np.abs(again - videos[name]).max() <= 1
  for name in ("bidirectional", "full_history"):
    assert np.abs(videos[name][0] - videos["causal"][0]).max() <= 1, name
    diff = np.abs(videos[name][1:] - videos["causal"][1:])
    assert np.mean(diff > 1) > 0.01, name


def test_history_ablations_are_refused_in_the_full_sequence_mode():
  for section, key in (("pyramid", "compress_history"), ("model", "blockwise_causal")):
    config = default.get_config("smoke")
    config.mode = "full_sequence"
    config.pyramid.num_stages = 3
    config[section][key] = False
    with pytest.raises(ValueError, match=f"config.{section}.{key}=False"):
      validation.validate(config)


def test_default_config_is_valid():
  validation.validate(default.get_config())
  with pytest.raises(ValueError, match="unknown config variants"):
    default.get_config("smoke,tiny")


def test_sampler_context_cache_matches_full_recompute():
  """With clean-conditioned captions, caching caption + history keys/values changes nothing."""
  config = smoke_config()
  config.model.text_time_conditioning = False
  graphdef, state = state_lib.init_state(spec_lib.resolve(config))
  rng = np.random.default_rng(0)  # move off the zero init so the output depends on everything
  params = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(p.dtype),
                        state["params"])
  cached = sample_lib.Sampler(spec_lib.resolve(config), graphdef, params)
  full = sample_lib.Sampler(spec_lib.resolve(config), graphdef, params)
  full.caches_context = False
  assert cached.caches_context
  kwargs = dict(num_frames=3, first_frame_steps=(2, 2, 2), later_frame_steps=(2, 1, 1),
                seed=3, progress=False)
  a = cached.generate("a rabbit", **kwargs).astype(int)
  b = full.generate("a rabbit", **kwargs).astype(int)
  assert np.abs(a - b).max() <= 1 and np.mean(a != b) < 0.01  # float rounding only
  assert a.std() > 1  # not a constant video


def test_a_run_initialised_from_another_starts_at_its_ema_parameters(uninterrupted, tmp_path):
  """``train.init_from``: the source's EMA parameters become step 0's parameters and EMA, with a
  fresh optimizer; a model of another shape is refused naming the field and the parameter."""
  config, source = uninterrupted
  spec = validation.validate(config)
  _, state = state_lib.init_state(spec)
  started = train.initialise_from(spec, state, source)
  ckpt = checkpointing.Checkpointer(os.path.join(source, "checkpoints"))
  saved, _ = ckpt.restore({"ema_params": state["ema_params"]}, partial=True)
  ckpt.close(check=False)
  for ours, theirs in ((started["params"], saved["ema_params"]),
                       (started["ema_params"], saved["ema_params"])):
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)
  assert int(started["step"]) == 0
  jax.tree.map(np.testing.assert_array_equal, started["opt_state"], state["opt_state"])
  other = smoke_config()
  other.model.patch_size = 8
  other_spec = spec_lib.resolve(other)
  _, other_state = state_lib.init_state(other_spec)
  with pytest.raises(Exception, match="config.train.init_from=.*its parameter .* has shape"):
    train.initialise_from(other_spec, other_state, source)
  with pytest.raises(Exception, match="no config.json"):
    train.initialise_from(spec, state, str(tmp_path))
  # From the command line, a new workdir starts there and trains on.
  config.train.init_from = source
  config.train.num_steps = 2
  train.train_and_evaluate(config, str(tmp_path / "finetuned"))
  assert (tmp_path / "finetuned" / "checkpoints" / "2").exists()
