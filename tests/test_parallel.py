"""Meshes, logical-axis rules and parallel layouts.

The layout equivalence runs on 8 CPU devices in one subprocess (``tests/layouts_check.py``): the
device count is fixed when JAX starts, and this test process has one device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import ml_collections
import pytest

from configs import default
from pfm import parallel, validation
from pfm.models import axes
from pfm import spec as spec_lib
from pfm import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# float32, different summation orders across devices: relative to the largest gradient entry.
GRAD_TOLERANCE = 1e-4
LOSS_TOLERANCE = 1e-5
# Two AdamW steps: the update is ~lr * g / |g|, so entries with near-zero gradients can move by a
# different fraction of lr (5e-4 here, half of it in warm-up) between layouts.
PARAM_TOLERANCE = 5e-5


@pytest.fixture(scope="module")
def layouts():
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="8")
  result = subprocess.run(
    [sys.executable, "-m", "tests.layouts_check"], cwd=ROOT, env=env, capture_output=True,
    text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


LAYOUTS = ("data", "fsdp", "tensor", "sequence", "fsdp_sequence_tensor")


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_one_device(layouts, name):
  """Each layout gives the one-device loss and gradients; FSDP/tensor shrink the parameters."""
  assert layouts["num_devices"] == 8
  r, single = layouts[name], layouts["single"]
  assert abs(r["loss"] - single["loss"]) <= LOSS_TOLERANCE * abs(single["loss"])
  assert r["grad_error"] <= GRAD_TOLERANCE, r
  mesh = r["mesh"]
  weight_split = mesh["fsdp"] * mesh["tensor"]
  if weight_split == 1:
    assert r["param_share_per_device"] == 1.0
  else:  # the big matrices are split; small vectors (norm scales, some biases) may not be
    assert r["param_share_per_device"] < 1.5 / weight_split, r
  if "params" in single and "param_error" in r:
    assert abs(r["step_loss"] - single["step_loss"]) <= LOSS_TOLERANCE * abs(single["step_loss"])
    assert r["param_error"] <= PARAM_TOLERANCE, r


def test_under_sharded_runs_fail(layouts):
  messages = layouts["under_sharding"]
  assert "not split over fsdp=8" in messages["replicated_rules"]
  assert "config.mesh" in messages["replicated_rules"]
  assert "the layout asks for" in messages["replicated_arrays"]


def test_per_shard_attention_wrapper_is_exact(layouts):
  """The shard_map wrapper of kernels XLA cannot partition (splash) keeps attention exact."""
  assert layouts["per_shard_attention_error"] <= 1e-5


def _mesh_config(**sizes):
  c = ml_collections.ConfigDict()
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, sequence=1, tensor=1, rules=()))
  c.mesh.update(sizes)
  return c


def test_mesh_shape_fills_and_names_the_field():
  assert parallel.mesh_shape(_mesh_config(fsdp=2, tensor=2), 8) == dict(
    data=2, fsdp=2, sequence=1, tensor=2)
  assert parallel.mesh_shape(_mesh_config(data=1, fsdp=-1), 4)["fsdp"] == 4
  with pytest.raises(ValueError, match="config.mesh.data=-1: the other axes .*tensor=3"):
    parallel.mesh_shape(_mesh_config(tensor=3), 8)
  with pytest.raises(ValueError, match="config.mesh: data=2"):
    parallel.mesh_shape(_mesh_config(data=2), 8)
  with pytest.raises(ValueError, match="config.mesh.fsdp=0"):
    parallel.mesh_shape(_mesh_config(fsdp=0), 8)
  with pytest.raises(ValueError, match="config.mesh.rules"):
    parallel.logical_rules(_mesh_config(rules=(("embedding", "fsdp"),)))
  with pytest.raises(ValueError, match="config.mesh.rules"):
    parallel.logical_rules(_mesh_config(rules=(("embed", "model"),)))


def test_default_rules_cover_exactly_the_logical_axis_names():
  """Every logical name of pfm.models.axes has a rule, and no rule names anything else."""
  names = [name for name, _ in parallel.DEFAULT_RULES]
  assert sorted(set(names)) == sorted(axes.LOGICAL_AXIS_NAMES) and len(names) == len(set(names))


def test_rules_override_and_partition_specs():
  """Config rules come first; every parameter's spec follows from its logical names."""
  config = default.get_config("smoke")
  config.mesh.rules = (("mlp", "fsdp"),)
  rules = parallel.logical_rules(config)
  _, abstract = state_lib.abstract_state(spec_lib.resolve(config))
  specs = parallel.partition_specs(abstract["params"], rules)
  fc1 = specs["blocks"][0]["video"]["mlp"]["fc1"]["kernel"].get_value()
  # ("embed", "mlp") both map to fsdp: a mesh axis splits one dimension, the first one.
  assert fc1 == jax.sharding.PartitionSpec("fsdp", None)
  fc2 = specs["blocks"][0]["video"]["mlp"]["fc2"]["kernel"].get_value()  # ("mlp", "embed")
  assert fc2 == jax.sharding.PartitionSpec("fsdp", None)
  rules = parallel.logical_rules(default.get_config("smoke"))
  specs = parallel.partition_specs(abstract["params"], rules)
  assert specs["blocks"][0]["video"]["mlp"]["fc1"]["kernel"].get_value() == (
    jax.sharding.PartitionSpec("fsdp", "tensor"))
  assert specs["blocks"][0]["video"]["qkv"]["q"]["kernel"].get_value() == (
    jax.sharding.PartitionSpec("fsdp", "tensor", None))


def test_config_validation_names_mesh_fields():
  config = default.get_config("smoke")
  config.mesh.tensor = 3
  with pytest.raises(ValueError, match="config.mesh"):
    validation.validate(config)
