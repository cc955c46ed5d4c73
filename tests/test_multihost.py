"""Multi-host training on loopback: 2 processes x 2 CPU devices (gloo) against 1 process x 4.

Run A: ``launch.local`` starts 2 processes of ``python -m pfm.train`` (mesh data=2 x fsdp=2
across both, each process reading one of the 2 data shards), 4 steps, checkpoints at 2 and 4.
Run B: 1 process with 4 devices and another mesh (fsdp=4) resumes A's step-2 checkpoint (arrays
restored into the new sharding, each data shard's iterator from the file A's process wrote) and
trains steps 3-4, which must match A's. The test process (1 device) then restores A's checkpoint
once more into its own mesh and checks the data order across the topology change.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import default
from launch import local
from pfm import checkpointing, parallel
from pfm import spec as spec_lib
from pfm import state as state_lib
from pfm.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {
  "data.batch_size": 4, "data.num_shards": 2, "train.num_steps": 4,
  "train.checkpoint_every_steps": 2, "train.log_every_steps": 2, "sample.num_videos": 0,
}
# Float32 across meshes and process counts: different reduction orders, two AdamW steps.
PARAM_TOLERANCE = 5e-5


def _command(workdir, **mesh):
  flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  flags += [f"--config.mesh.{axis}={size}" for axis, size in mesh.items()]
  return [sys.executable, "-m", "pfm.train", "--config=configs/default.py:smoke",
          f"--workdir={workdir}", *flags]


def _config(**mesh):
  config = default.get_config("smoke")
  for key, value in OVERRIDES.items():
    section, field = key.split(".")
    config[section][field] = value
  for axis, size in mesh.items():
    config.mesh[axis] = size
  return config


def _restore(workdir, step, config, data=None):
  """The state of ``workdir``'s checkpoint ``step`` on this process's mesh (one device)."""
  mesh = parallel.create_mesh(config, jax.devices()[:1])
  rules = parallel.logical_rules(config)
  _, abstract = state_lib.abstract_state(spec_lib.resolve(config))
  shardings = parallel.named_shardings(abstract, mesh, rules)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  state, _ = ckpt.restore(state_lib.sharded_abstract_state(abstract, shardings), data, step)
  ckpt.close()
  return state


def _max_difference(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  run_a, run_b = str(root / "a"), str(root / "b")
  result = local.launch(_command(run_a, data=2, fsdp=2), num_processes=2, devices_per_process=2,
                        cwd=ROOT, echo=False, timeout=600)
  result.check()
  shutil.copytree(run_a, run_b)
  shutil.rmtree(os.path.join(run_b, "checkpoints", "4"))
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="4")
  single = subprocess.run(_command(run_b, data=1, fsdp=4), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-4000:]
  return run_a, run_b, result, single.stderr


def test_two_processes_match_one_process_with_another_mesh(runs):
  run_a, run_b, result, log_b = runs
  assert "over 4 devices of 2 processes" in result.outputs[0]
  assert "Resumed from step 2" in log_b and "over 4 devices of 1 processes" in log_b
  config = _config()
  # Each of A's processes wrote its own data shard; the arrays were written once, collectively.
  data_dir = os.path.join(run_a, "checkpoints", "2", "data")
  assert sorted(f for f in os.listdir(data_dir) if f.endswith(".json")) == [
    "shard_0-of-2.json", "shard_1-of-2.json"]
  a2, a4 = _restore(run_a, 2, config), _restore(run_a, 4, config)
  b4 = _restore(run_b, 4, config)
  assert int(a4["step"]) == int(b4["step"]) == 4
  moved = _max_difference(a2["params"], a4["params"])
  assert moved > 10 * PARAM_TOLERANCE  # steps 3-4 changed the parameters (by ~2 lr) ...
  difference = _max_difference(a4["params"], b4["params"])
  print(f"steps 3-4 moved the parameters by up to {moved:.2e}; A and B differ by {difference:.2e}")
  assert difference <= PARAM_TOLERANCE  # ... the same way
  assert _max_difference(a4["opt_state"], b4["opt_state"]) <= PARAM_TOLERANCE


def test_data_order_survives_a_change_of_process_count(runs):
  """A's two per-process shard files restore into one process owning both shards."""
  run_a, _, _, _ = runs
  config = _config()
  fresh = pipeline.ProcessBatches(spec_lib.resolve(config), seed=config.seed)
  for _ in range(2):
    next(fresh)
  expected = next(fresh)  # the batch of step 3
  restored = pipeline.ProcessBatches(spec_lib.resolve(config), seed=config.seed)
  _restore(run_a, 2, config, data=restored)
  batch = next(restored)
  assert batch.clean_end.shape[0] == 4
  for name, value in expected.as_dict().items():
    np.testing.assert_array_equal(getattr(batch, name), value)
