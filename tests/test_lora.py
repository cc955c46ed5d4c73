"""LoRA fine-tuning (pfm.lora) on the smoke model: no-op adapters at the start, training that moves
only the adapters, checkpoints of adapters only, merged sampling, resume on the same base, and
config errors that name the field.

The run adapted is a smoke workdir written directly (random weights saved as a checkpoint), so
no full training run is needed: the only train step compiled is the LoRA one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import finetune_lora
from pfm import checkpointing, errors, lora, models, parallel, train, validation
from pfm import sample as sample_lib
from pfm import spec as spec_lib
from pfm import state as state_lib
from pfm.batch import TextTokens, VideoTokens
from pfm.models import stacking

SOURCE_STEP = 3


def perturbed(tree, seed, scale=0.05):
  """Every array moved off its (partly zero) initial value, so outputs depend on every weight."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape).astype(p.dtype), tree)


def source_spec():
  """The smoke run that LoRA adapts (the model of ``configs/finetune_lora.py:smoke``)."""
  config = finetune_lora.get_config("smoke")
  config.train.lora.rank = 0
  return spec_lib.resolve(config)


def initial_state(spec):
  """``(graphdef, state)`` as a run creates them (jitted, so the compiled program is shared)."""
  mesh, rules = parallel.create_mesh(spec.config), parallel.logical_rules(spec.config)
  graphdef, state, _ = state_lib.create_sharded_state(spec, mesh, rules)
  return graphdef, state


@functools.cache
def _forward(graphdef):
  return jax.jit(lambda states, inputs: nnx.merge(graphdef, *states)(*inputs))


def forward(graphdef, *states, inputs):
  """The model ``nnx.merge(graphdef, *states)`` on ``inputs``, jitted."""
  return _forward(graphdef)(states, inputs)


def save_source(spec, workdir, step, seed):
  """A pfm workdir whose checkpoint ``step`` holds random weights (N(0, 0.05^2): every output
  depends on every weight; nothing to compile); returns them."""
  _, abstract = state_lib.abstract_base(spec)
  params = perturbed(jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract), seed)
  train._write_config(spec, workdir)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=None)
  ckpt.save(step, dict(step=jnp.int32(step), params=params, ema_params=params), force=True)
  ckpt.close()
  return params


def model_inputs(spec, seed=0, length=12, text_length=10):
  """Two rows of three frame units of 4 tokens plus captions: ``(VideoTokens, TextTokens)``."""
  rng = np.random.default_rng(seed)
  rows = (2, length)
  video = VideoTokens(
      tokens=jnp.asarray(rng.standard_normal(rows + (spec.model.patch_dim,)), jnp.float32),
      t=jnp.asarray(rng.uniform(0, 1, rows), jnp.float32),
      segment_ids=jnp.ones(rows, jnp.int32),
      causal_block=jnp.asarray(np.broadcast_to(np.arange(length) // 4, rows), jnp.int32),
      positions=jnp.asarray(np.broadcast_to(
          np.stack([np.arange(length) % 4 // 2, np.arange(length) % 2], -1), rows + (2,)),
          jnp.float32))
  text = TextTokens(segment_ids=jnp.ones((2, text_length), jnp.int32),
                    t=jnp.ones((2, text_length)),
                    tokens=jnp.asarray(rng.integers(2, 258, (2, text_length)), jnp.int32))
  return video, text


def lora_config(source):
  """``configs/finetune_lora.py:smoke`` from ``source``: 4 steps, checkpoints every 2."""
  config = finetune_lora.get_config("smoke")
  config.train.init_from = source
  config.sample.num_videos = 0
  config.optimizer.learning_rate = 1e-2  # adapters move visibly in 4 steps
  config.train.num_steps = 4
  config.train.checkpoint_every_steps = 2
  config.train.log_every_steps = 2
  return config


def folder_digest(folder):
  digest = hashlib.sha256()
  for root, _, names in sorted(os.walk(folder)):
    for name in sorted(names):
      with open(os.path.join(root, name), "rb") as f:
        digest.update(name.encode() + f.read())
  return digest.hexdigest()


def folder_bytes(folder):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(folder)
             for f in names)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """The run to adapt: ``(workdir, its EMA parameters)``."""
  workdir = str(tmp_path_factory.mktemp("source"))
  return workdir, save_source(source_spec(), workdir, SOURCE_STEP, seed=0)


@pytest.fixture(scope="module")
def lora_run(source, tmp_path_factory):
  """4 LoRA steps from ``source`` (checkpoints 2 and 4): ``(config, workdir, final state)``."""
  workdir = str(tmp_path_factory.mktemp("lora"))
  digest = folder_digest(source[0])
  config = lora_config(source[0])
  state = train.train_and_evaluate(config, workdir)
  assert folder_digest(source[0]) == digest  # the source is only read
  return config, workdir, state


@pytest.fixture(scope="module")
def fresh(source):
  """The LoRA run's spec and its initial ``(graphdef, state)``."""
  spec = validation.validate(lora_config(source[0]))
  return (spec, *initial_state(spec))


def test_adapters_start_as_a_no_op_on_attention_and_mlp(source, fresh):
  _, base = source
  spec, graphdef, state = fresh
  plain_graphdef, _ = state_lib.abstract_base(spec)
  inputs = model_inputs(spec)
  expected = forward(plain_graphdef, base, inputs=inputs)
  # B = 0: x A B adds exact zeros (XLA may fuse the sums in another order: float rounding).
  for path, value in nnx.to_flat_state(state["params"]):
    assert path[-1].endswith("_lora_a") or not np.any(value.get_value())
  np.testing.assert_allclose(forward(graphdef, state["params"], base, inputs=inputs), expected,
                             rtol=0, atol=1e-6)
  layers = {"/".join(map(str, path[:-1])) for path, _ in nnx.to_flat_state(state["params"])}
  for layer in ("qkv/q", "qkv/k", "qkv/v", "out", "mlp/fc1", "mlp/fc2"):
    assert f"blocks/0/video/{layer}" in layers and f"blocks/0/text/{layer}" in layers
  assert not any("modulation" in name or "text_encoder" in name for name in layers)
  assert all(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(state["params"]))
  assert models.count_params(state["params"]) < models.count_params(base) / 10


def test_scanned_and_rematerialised_blocks_carry_the_same_adapters(source, fresh):
  """Adapters are created on unstacked blocks and stacked for ``scan_layers``; qwix applies them
  inside the scan and under ``jax.checkpoint``: the outputs agree with the plain model's."""
  _, base = source
  spec, graphdef, state = fresh
  adapters = perturbed(state["params"], seed=1, scale=0.1)
  inputs = model_inputs(spec)
  expected = forward(graphdef, adapters, base, inputs=inputs)
  plain = forward(state_lib.abstract_base(spec)[0], base, inputs=inputs)
  assert np.abs(expected - plain).max() > 1e-3
  model_config = dataclasses.replace(spec.model, scan_layers=True, remat_policy="dots")
  scanned_graphdef, scanned_adapters, scanned_base = lora.split(nnx.eval_shape(
      lambda: lora.add_adapters(models.build_model(model_config, rngs=nnx.Rngs(0)), spec.lora)))
  nnx.replace_by_pure_dict(scanned_adapters, stacking.stack_layers(nnx.to_pure_dict(adapters)))
  nnx.replace_by_pure_dict(scanned_base, stacking.stack_layers(nnx.to_pure_dict(base)))
  got = forward(scanned_graphdef, scanned_adapters, scanned_base, inputs=inputs)
  np.testing.assert_allclose(got, expected, atol=2e-5)


def test_training_moves_only_the_adapters_and_checkpoints_only_them(source, fresh, lora_run):
  workdir, base = source
  spec, _, initial = fresh
  config, run_dir, state = lora_run
  # The base the run trained on is the source's EMA, bit for bit, and is recorded.
  ckpt = checkpointing.Checkpointer(os.path.join(run_dir, "checkpoints"))
  _, abstract = state_lib.abstract_state(spec)
  saved, step = ckpt.restore(abstract)
  ckpt.close()
  assert step == 4 and ckpt.restored_extra[state_lib.LORA_BASE_STEP] == SOURCE_STEP
  read, read_step = state_lib.read_lora_base(spec, SOURCE_STEP)
  assert read_step == SOURCE_STEP
  jax.tree.map(np.testing.assert_array_equal, read, base)
  # Only adapters were optimised, averaged and saved; they moved (B from zero), all but the
  # query of the last block's text stream, whose output no token reads (SD3's pre-only stream).
  for tree in (state["params"], saved["ema_params"], saved["params"]):
    assert all(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(tree))
  moved = {"/".join(map(str, path)): float(jnp.abs(new - old).max()) for (path, new), (_, old)
           in zip(nnx.to_flat_state(saved["params"]), nnx.to_flat_state(initial["params"]))}
  assert [name for name, d in moved.items() if d == 0] == [
      "blocks/1/text/qkv/q/kernel_lora_a", "blocks/1/text/qkv/q/kernel_lora_b"]
  jax.tree.map(np.testing.assert_array_equal, saved["params"], state["params"])
  # The checkpoint holds adapters, their optimizer moments and EMA (and the step, the key and the
  # optimizer's counts): a fraction of the model.
  state_dir = os.path.join(run_dir, "checkpoints", "4", "state")
  tree = ocp.StandardCheckpointer().metadata(state_dir).item_metadata.tree
  names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  assert len(names) == 4 * 2 * 21 + 4  # params, ema, 2 moments; A and B of 21 layers
  assert sorted(n for n in names if "_lora_" not in n) == [
      "['opt_state'][1][0]['count']", "['opt_state'][1][2]['count']", "['rng']", "['step']"]
  lora_bytes = folder_bytes(state_dir)
  full_bytes = folder_bytes(os.path.join(workdir, "checkpoints", str(SOURCE_STEP), "state"))
  assert lora_bytes < full_bytes / 3, (lora_bytes, full_bytes)


def test_merged_sampler_equals_the_lora_model(source, fresh, lora_run):
  """``Sampler.from_workdir`` on a LoRA workdir samples with W + (alpha / r) A B; the plain model
  on those weights gives the adapted model's output, and full fine-tuning from the LoRA workdir
  (``train.init_from``) starts from the same merged weights."""
  workdir, base = source
  spec, graphdef, _ = fresh
  _, run_dir, state = lora_run
  sampler = sample_lib.Sampler.from_workdir(run_dir)
  merged = sampler._params
  assert not list(nnx.to_flat_state(merged.filter(nnx.LoRAParam)))
  inputs = model_inputs(spec, seed=2)
  adapted = forward(graphdef, state["ema_params"], base, inputs=inputs)
  np.testing.assert_allclose(forward(sampler._graphdef, merged, inputs=inputs), adapted,
                             atol=2e-5)
  assert np.abs(adapted - forward(sampler._graphdef, base, inputs=inputs)).max() > 1e-4
  full, step = state_lib.read_ema_params(state_lib.abstract_base(spec)[1], run_dir)
  assert step == 4
  jax.tree.map(np.testing.assert_array_equal, full, merged)


def test_resume_continues_on_the_same_base(source, lora_run, tmp_path):
  """Resumed from step 2, a LoRA run reads the source checkpoint its adapters were trained on,
  even when the source has a newer one, and reaches step 4's adapters exactly (same data order)."""
  config, run_dir, state = lora_run
  moved_source = str(tmp_path / "source")
  shutil.copytree(source[0], moved_source)
  save_source(source_spec(), moved_source, SOURCE_STEP + 10, seed=5)  # the source trained on
  resumed_dir = str(tmp_path / "resumed")
  shutil.copytree(run_dir, resumed_dir)
  config = lora_config(moved_source)
  assert state_lib.read_lora_base(spec_lib.resolve(config))[1] == SOURCE_STEP + 10  # a new run
  resumed = train.train_and_evaluate(config, resumed_dir, resume_step=2)
  assert int(resumed["step"]) == 4
  jax.tree.map(np.testing.assert_array_equal, resumed["params"], state["params"])
  jax.tree.map(np.testing.assert_array_equal, resumed["ema_params"], state["ema_params"])
  ckpt = checkpointing.Checkpointer(os.path.join(resumed_dir, "checkpoints"))
  ckpt.restore(state_lib.abstract_state(spec_lib.resolve(config))[1])
  ckpt.close()
  assert ckpt.restored_extra[state_lib.LORA_BASE_STEP] == SOURCE_STEP
  # Without its base checkpoint the run cannot go on, and says which one it needs.
  shutil.rmtree(os.path.join(moved_source, "checkpoints", str(SOURCE_STEP)))
  with pytest.raises(checkpointing.CheckpointError, match=f"trained on checkpoint {SOURCE_STEP} "
                     "of config.train.init_from="):
    sample_lib.Sampler.from_workdir(resumed_dir)


@pytest.mark.parametrize("overrides, message", [
    ({"train.lora.rank": -1}, "config.train.lora.rank=-1: need a whole number >= 0"),
    ({"train.lora.rank": 2.5}, "config.train.lora.rank=2.5: need a whole number"),
    ({"train.lora.alpha": 0.0}, "config.train.lora.alpha=0.0: need a number > 0"),
    ({"train.init_from": ""}, "config.train.lora.rank=4 .* set config.train.init_from"),
    ({"train.lora.targets": ("attention", "(")}, "config.train.lora.targets=.*'\\(' is neither"),
    ({"train.lora.targets": ()}, "config.train.lora.targets=\\(\\): need at least one"),
])
def test_invalid_lora_configs_name_the_field(source, overrides, message):
  config = lora_config(source[0])
  for name, value in overrides.items():
    section, *rest = name.split(".")
    node = config[section]
    for key in rest[:-1]:
      node = node[key]
    with node.ignore_type():
      node[rest[-1]] = value
  with pytest.raises(errors.ConfigError, match=message):
    validation.validate(config)


def test_targets_that_match_no_layer_are_refused_by_name(source):
  config = lora_config(source[0])
  config.train.lora.targets = ("attention_typo",)
  with pytest.raises(errors.ConfigError, match="config.train.lora.targets: .* matches no linear"):
    state_lib.abstract_state(validation.validate(config))
  config.train.lora.targets = (r"blocks/0/video/qkv/q",)
  config.train.inherit = False  # a model of its own, not the source's
  config.model.scan_layers = True
  config.model.variant = "XS"  # 4 blocks: 0..2 stacked
  config.model.patch_size = 4
  with pytest.raises(errors.ConfigError,
                     match="selects blocks/<i>/video/qkv/q for i in \\[0\\] only"):
    state_lib.abstract_state(spec_lib.resolve(config))
