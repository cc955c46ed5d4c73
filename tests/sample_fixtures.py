"""What the sampler tests share (not a test file): smoke configs, perturbed parameters and
a workdir that ``Sampler.from_workdir`` and ``python -m pfm.sample`` open, written in a second
instead of trained.

Import as ``from tests.sample_fixtures import ...``; importing it changes no JAX setting, so the
8-device check (``tests/sample_layouts_check.py``) and the one-device tests share it.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from configs import default, tpdiff
from pfm import checkpointing
from pfm import spec as spec_lib
from pfm import state as state_lib

# One Euler step per stage for every unit: one compiled program per batch size and length, the
# same in the tests, in their `pfm.sample` subprocesses and in the 8-device check, so the
# persistent compilation cache (tests/conftest.py) serves them all.
STEPS = (1, 1, 1)


def smoke_config(name: str = "default"):
  """``configs/default.py:smoke`` (autoregressive, pixels) with `STEPS` for every unit, or
  ``configs/tpdiff.py:smoke`` (``name="tpdiff"``, full sequence) with 3 steps in all."""
  if name == "tpdiff":
    config = tpdiff.get_config("smoke")
    config.sample.total_steps = 3
    return config
  config = default.get_config("smoke")
  config.sample.first_frame_steps = config.sample.later_frame_steps = STEPS
  return config


def perturbed_params(spec: spec_lib.RunSpec, scale: float = 0.05, seed: int = 0):
  """``(graphdef, params)``: the initial parameters moved off their zero init (N(0, scale^2)
  added to every entry), so the output depends on every weight."""
  graphdef, _ = state_lib.abstract_state(spec)
  params = jax.jit(lambda: nnx.split(state_lib.build_model(spec, spec.config.seed), nnx.Param)[1])()
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
      lambda p: p + scale * rng.standard_normal(p.shape).astype(p.dtype), params)
  return graphdef, params


def write_workdir(config, root: str) -> spec_lib.RunSpec:
  """A workdir in ``root``: ``config.json`` and checkpoint 1 holding `perturbed_params` as the
  EMA parameters (what sampling reads)."""
  spec = spec_lib.resolve(config)
  _, params = perturbed_params(spec)
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "config.json"), "w") as f:
    f.write(spec.config.to_json_best_effort(indent=2))
  checkpointer = checkpointing.Checkpointer(os.path.join(root, "checkpoints"))
  checkpointer.save(1, {"ema_params": params}, force=True)
  checkpointer.close()
  return spec
