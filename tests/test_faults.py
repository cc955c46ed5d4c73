"""Faults on the smoke config: kills, damaged checkpoints, a full disk, divergence, bad arguments.

Each test asserts that nothing committed is lost and that the message names the cause. Bad
manifests and media files are in ``test_faults_data.py``.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from configs import default
from pfm import checkpointing, errors, train, validation
from pfm import sample as sample_lib
from pfm import spec as spec_lib
from pfm import state as state_lib
from pfm.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--config=configs/default.py:smoke"]


def smoke_config(**train_overrides):
  config = default.get_config("smoke")
  config.sample.num_videos = 0
  config.train.checkpoint_every_steps = 6
  for name, value in train_overrides.items():
    config.train[name] = value
  return config


def run(args, **kwargs):
  """``python -m ARGS`` in the repository; returns the CompletedProcess (text output)."""
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                        **kwargs)


def restore_all(workdir, step=None, data=False):
  """The train state of ``workdir``'s checkpoint (newest intact, or ``step``) and its step; with
  ``data``, the data iterator's state is restored too."""
  spec = spec_lib.resolve(smoke_config())
  _, abstract = state_lib.abstract_state(spec)
  data_iter = pipeline.ProcessBatches(spec, seed=0) if data else None
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    return ckpt.restore(abstract, data_iter, step=step)
  finally:
    ckpt.close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished 12-step smoke run with checkpoints 6 and 12 (a workdir to copy, not to change)."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  train.train_and_evaluate(smoke_config(), workdir)
  return workdir


@pytest.fixture
def run_copy(trained, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  return workdir


def largest_file(folder):
  files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
  return max(files, key=os.path.getsize)


# -- (a) divergence ----------------------------------------------------------------------------


def test_diverged_state_is_never_checkpointed(run_copy):
  """lr = 1e30: finite loss and gradients, finite but absurd parameters; the forward pass of the
  updated parameters at the checkpoint step is not finite, so step 13 is not saved."""
  config = smoke_config(num_steps=13)
  config.optimizer.learning_rate = 1e30
  with pytest.raises(train.NonFiniteLossError,
                     match="after step 13 .*not checkpointed; the last good checkpoint is step 12"):
    train.train_and_evaluate(config, run_copy)
  state, step = restore_all(run_copy)
  assert step == 12 and checkpointing.Checkpointer(
      os.path.join(run_copy, "checkpoints")).steps == [6, 12]  # nothing rotated away
  assert checkpointing.inspect_state(state).num_nonfinite == 0


@pytest.mark.parametrize("value", [1e39, float("inf"), float("nan")])
def test_non_finite_config_values_are_refused(value):
  config = smoke_config()
  config.optimizer.learning_rate = value
  with pytest.raises(errors.ConfigError, match="config.optimizer.learning_rate="):
    validation.validate(config)


# -- (b), (c) damaged checkpoints --------------------------------------------------------------


def test_flipped_bytes_are_detected_and_the_run_falls_back(run_copy):
  data_file = largest_file(os.path.join(run_copy, "checkpoints", "12", "state"))
  with open(data_file, "r+b") as f:
    f.seek(os.path.getsize(data_file) // 2)
    f.write(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
  with pytest.raises(checkpointing.CheckpointDamagedError, match="checkpoint 12 .* is damaged"):
    restore_all(run_copy, step=12)
  state, step = restore_all(run_copy)  # the newest intact one
  assert step == 6 and int(state["step"]) == 6
  assert checkpointing.inspect_state(state).num_nonfinite == 0


@pytest.mark.parametrize("item", ["state", "data"])
def test_truncated_files_are_detected_and_the_run_falls_back(run_copy, item):
  """The largest array file, or the data iterator's file, of checkpoint 12 cut to half."""
  path = largest_file(os.path.join(run_copy, "checkpoints", "12", item))
  os.truncate(path, os.path.getsize(path) // 2)
  with pytest.raises(checkpointing.CheckpointDamagedError, match="checkpoint 12 .* is damaged"):
    restore_all(run_copy, step=12, data=True)
  state, step = restore_all(run_copy, data=True)
  assert step == 6 and int(state["step"]) == 6


def test_deleted_manifest_falls_back_in_train_and_sample(run_copy, caplog):
  os.remove(os.path.join(run_copy, "checkpoints", "12", "state", "manifest.ocdbt"))
  sampler = sample_lib.Sampler.from_workdir(run_copy)  # falls back, changes nothing
  reference, _ = restore_all(run_copy, step=6)
  for x, y in zip(jax.tree.leaves(reference["ema_params"]), jax.tree.leaves(sampler._params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert os.path.isdir(os.path.join(run_copy, "checkpoints", "12"))
  with caplog.at_level("WARNING"):
    train.train_and_evaluate(smoke_config(), run_copy)  # resumes from 6, trains 7..12 again
  assert "checkpoint 12" in caplog.text and "is damaged" in caplog.text
  assert os.path.isdir(os.path.join(run_copy, "checkpoints_set_aside", "12-damaged"))
  state, step = restore_all(run_copy)
  assert step == 12 and int(state["step"]) == 12


def test_resume_from_a_chosen_step_sets_the_later_ones_aside(run_copy):
  config = smoke_config()
  graphdef, state = state_lib.init_state(spec_lib.resolve(config))
  data = pipeline.ProcessBatches(spec_lib.resolve(config), seed=config.seed)
  ckpt = checkpointing.Checkpointer(os.path.join(run_copy, "checkpoints"))
  try:
    with pytest.raises(checkpointing.CheckpointError, match="no checkpoint 7 .* has \\[6, 12\\]"):
      train._restore(ckpt, state, data, resume_step=7)
    restored_state, step = train._restore(ckpt, state, data, resume_step=6)
    assert step == 6 and int(restored_state["step"]) == 6 and ckpt.steps == [6]
  finally:
    ckpt.close()
  assert os.listdir(os.path.join(run_copy, "checkpoints_set_aside")) == ["12-superseded"]
  _, step = restore_all(run_copy)
  assert step == 6


def test_no_intact_checkpoint_names_every_cause(run_copy):
  for step in (6, 12):
    os.remove(os.path.join(run_copy, "checkpoints", str(step), "state", "manifest.ocdbt"))
  with pytest.raises(checkpointing.NoCheckpointError, match="no intact checkpoint .*12: .*; 6: "):
    restore_all(run_copy)
  assert sorted(os.listdir(os.path.join(run_copy, "checkpoints"))) == ["12", "6"]  # untouched


def test_sample_command_reports_a_damaged_step_in_one_line(run_copy):
  os.remove(os.path.join(run_copy, "checkpoints", "12", "state", "manifest.ocdbt"))
  result = run(["pfm.sample", f"--workdir={run_copy}", "--prompt=x", "--step=12"])
  assert result.returncode == 1, result.stderr[-2000:]
  assert "pfm.sample: error: checkpoint 12 in" in result.stderr and "is damaged" in result.stderr
  assert "Traceback" not in result.stderr


# -- (d) full disk -----------------------------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(path, megabytes):
  """A tmpfs of ``megabytes`` at ``path`` (needs root), or None where it cannot be mounted."""
  os.makedirs(path)
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", path],
                           capture_output=True).returncode == 0
  try:
    yield mounted
  finally:
    if mounted:
      subprocess.run(["umount", "-l", path], check=False)


def test_full_disk_stops_the_run_at_once_and_keeps_the_last_checkpoint(trained, tmp_path,
                                                                       monkeypatch):
  """The finished run (checkpoints 6 and 12, about 5 MB each) on a filesystem with room for
  neither a third checkpoint nor, after rotation, a second: it goes on to step 120 with a
  checkpoint every 12 steps; step 24 cannot be written and the run must stop before step 36.

  A smoke step takes milliseconds, less than the background writer may need on a loaded machine
  to hit the full disk; each step's check is paced to 0.5 s, a fast real step."""
  check = checkpointing.Checkpointer.check
  monkeypatch.setattr(checkpointing.Checkpointer, "check",
                      lambda self: (time.sleep(0.5), check(self))[1])
  workdir = str(tmp_path / "disk")
  config = smoke_config(num_steps=120, checkpoint_every_steps=12, max_checkpoints=3)
  with small_filesystem(workdir, 12) as mounted:
    if mounted:
      for name in os.listdir(trained):
        copy = shutil.copytree if os.path.isdir(os.path.join(trained, name)) else shutil.copy
        copy(os.path.join(trained, name), os.path.join(workdir, name))
      with pytest.raises(checkpointing.CheckpointSaveError) as info:
        train.train_and_evaluate(config, workdir)
      message = str(info.value)
      assert "checkpoint 24 could not be written" in message, message
      assert "No space left on device" in message and "newest committed checkpoint is 12" in message
      _, step = restore_all(workdir)
      assert step == 12
    else:  # no mount here: the same failure injected as a file size limit (RLIMIT_FSIZE)
      result = run(["pfm.train", *SMOKE, f"--workdir={workdir}", "--config.sample.num_videos=0",
                    "--config.train.num_steps=120", "--config.train.checkpoint_every_steps=12"],
                   preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20,) * 2))
      assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
      message = result.stderr.strip().splitlines()[-1]
      assert message.startswith("pfm.train: error: checkpoint 12 could not be written"), message
      assert "no checkpoint was committed" in message
  stopped = int(message.rsplit("training stopped at step ", 1)[1].split()[0])
  assert stopped < 36, f"the failed save surfaced only at step {stopped}"


# -- (f) a kill after the last checkpoint --------------------------------------------------------


def wait_for(path, proc, timeout=300):
  deadline = time.time() + timeout
  while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  return os.path.exists(path)


def test_kill_during_final_sampling_then_restart_writes_the_samples(tmp_path):
  workdir = str(tmp_path / "late")
  overrides = ["--config.train.num_steps=6", "--config.train.checkpoint_every_steps=6"]
  proc = subprocess.Popen([sys.executable, "-m", "pfm.train", *SMOKE, f"--workdir={workdir}",
                           *overrides], cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  committed = wait_for(os.path.join(workdir, "checkpoints", "6", "commit_success.txt"), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert committed, "the run never committed checkpoint 6"
  samples = os.path.join(workdir, "samples", "step_0000006", "metrics.json")
  assert not os.path.exists(samples), "the kill came too late to test anything"
  config = default.get_config("smoke")
  config.train.num_steps, config.train.checkpoint_every_steps = 6, 6
  train.train_and_evaluate(config, workdir)
  assert os.path.exists(samples)
  assert os.path.exists(os.path.join(workdir, "samples", "step_0000006", "sample_0.mp4"))


def test_kill_during_a_save_keeps_the_committed_checkpoints(tmp_path):
  """SIGKILL while checkpoint 4 is being written (its temporary folder exists)."""
  workdir = str(tmp_path / "midsave")
  proc = subprocess.Popen(
      [sys.executable, "-m", "pfm.train", *SMOKE, f"--workdir={workdir}",
       "--config.sample.num_videos=0", "--config.train.checkpoint_every_steps=2",
       "--config.train.num_steps=100000"],
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  folder = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline and not any(
      name.startswith("4.") for name in (os.listdir(folder) if os.path.isdir(folder) else ())):
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  ckpt = checkpointing.Checkpointer(folder)
  steps = ckpt.steps
  ckpt.close()
  assert 2 in steps and all(s <= 4 for s in steps)
  state, step = restore_all(workdir)
  assert step == max(steps) and int(state["step"]) == step
  config = smoke_config(num_steps=step + 2, checkpoint_every_steps=2)
  state = train.train_and_evaluate(config, workdir)  # resumes, saves over the partial folder
  assert int(state["step"]) == step + 2


# -- (e), (g), (i) bad arguments: one line, no traceback -----------------------------------------


@pytest.mark.parametrize("section, field, value, message", [
    ("data", "height", 0, "config.data.height=0: need a whole number >= 1"),
    ("model", "patch_size", 0, "config.model.patch_size=0: need a whole number >= 1"),
    ("pyramid", "stage_weights", ("heavy",), "config.pyramid.stage_weights=.*heavy"),
])
def test_validation_names_the_field(section, field, value, message):
  config = smoke_config()
  config[section][field] = value
  with pytest.raises(errors.ConfigError, match=message):
    validation.validate(config)


def test_train_command_prints_user_errors_in_one_line(tmp_path):
  result = run(["pfm.train", *SMOKE, f"--workdir={tmp_path}", "--config.pyramid.stage_weights=heavy"])
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(
      "pfm.train: error: config.pyramid.stage_weights=('heavy',)")
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--num_frames=0"], "num_frames=0: need a whole number >= 1"),
    (["--first_frame_steps=2,2"], r"first_frame_steps=\(2, 2\): need >= 1 step for each of "
                                  "the 3"),
    (["--output={file}/out.mp4"], "cannot write --output=.*/file is a file, not a folder"),
])
def test_sample_command_rejects_bad_arguments_before_sampling(trained, tmp_path, args, message):
  a_file = tmp_path / "file"
  a_file.write_text("")
  result = run(["pfm.sample", f"--workdir={trained}", "--prompt=x",
                *[a.format(file=a_file) for a in args]])
  assert result.returncode == 1, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("pfm.sample: error: ") and __import__("re").search(message, last), last
  assert "Traceback" not in result.stderr


def test_sampler_warns_when_a_caption_is_cut(trained, caplog):
  sampler = sample_lib.Sampler.from_workdir(trained)
  budget = sampler.config.data.caption_length - 1
  with caplog.at_level("WARNING"):
    tokens = sampler.caption("é" * budget).tokens  # two bytes each
  assert f"the model reads the first {budget}" in caplog.text
  from pfm.data import text
  assert text.decode_caption(np.asarray(tokens[0])) == "é" * (budget // 2)


# -- launch.local --------------------------------------------------------------------------------


def test_launch_is_installed_and_a_survivor_stops_at_sigterm(tmp_path):
  """From another folder, a peer dies; the survivor stops at SIGTERM, long before the grace."""
  script = tmp_path / "peer.py"
  script.write_text(textwrap.dedent("""
      import os, time
      from pfm import distributed
      distributed.initialize()
      if os.environ["JAX_PROCESS_ID"] == "1":
        time.sleep(1)
        os.kill(os.getpid(), 9)
      time.sleep(120)
  """))
  start = time.monotonic()
  result = subprocess.run(
      [sys.executable, "-m", "launch.local", "--num_processes=2", "--grace_period=60", "--",
       sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=200)
  elapsed = time.monotonic() - start
  assert result.returncode == 137, result.stderr[-2000:]
  assert "process 1 exited with -9; stopped the others (return codes [-15, -9])" in result.stderr
  assert elapsed < 45, f"the surviving process ignored SIGTERM ({elapsed:.0f} s)"
