"""Tests of pfm.models: the MM-DiT on packed token batches, its mask, text path and sizes."""

from __future__ import annotations

import collections
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pfm import models
from pfm.batch import TextTokens, VideoTokens
from pfm.models import axes, kernels, masks, stacking, text

# Row 0 packs two samples: segment 1 has three 2x2 frame units (frames 0, 1, 2), segment 2 has
# two 1x2 units placed at fractional positions, then 4 padding tokens. Row 1 has one sample of
# three 2x2 units and 8 padding tokens.
L, LT = 20, 16
SMOKE = models.model_config("smoke", text_embed_dim=24)
GRID = [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)]


def _row(units):
  """units: list of (segment, frame, positions) -> (segment_ids, frames, positions) padded."""
  seg, frame, pos = [], [], []
  for s, f, ps in units:
    seg += [s] * len(ps)
    frame += [f] * len(ps)
    pos += ps
  pad = L - len(seg)
  return seg + [0] * pad, frame + [0] * pad, pos + [(0.0, 0.0)] * pad


def _caption(*captions):
  """Packs (segment, caption) pairs into token ids and segment ids of length LT."""
  tokens, seg = [], []
  for s, c in captions:
    ids = [text.BOS_ID] + [b + text.BYTE_OFFSET for b in c.encode("utf-8")]
    tokens += ids
    seg += [s] * len(ids)
  pad = LT - len(tokens)
  return tokens + [0] * pad, seg + [0] * pad


def make_batch(seed: int = 0) -> dict[str, jax.Array]:
  rows = [
    _row([(1, 0, GRID), (1, 1, GRID), (1, 2, GRID),
          (2, 0, [(0.5, 0.5), (0.5, 1.5)]), (2, 1, [(0.5, 0.5), (0.5, 1.5)])]),
    _row([(1, 0, GRID), (1, 1, GRID), (1, 2, GRID)]),
  ]
  captions = [_caption((1, "a cat"), (2, "")), _caption((1, "dog runs"))]
  rng = np.random.default_rng(seed)
  cfg = models.model_config("smoke")
  video_t = rng.uniform(0.0, 1.0, (2, L)).astype(np.float32)
  video_t[:, :4] = 0.97  # First unit is (slightly corrupted) history.
  return dict(
    video_tokens=jnp.asarray(rng.normal(size=(2, L, cfg.patch_dim)), jnp.float32),
    video_t=jnp.asarray(video_t),
    video_segment_ids=jnp.asarray([r[0] for r in rows], jnp.int32),
    causal_block=jnp.asarray([r[1] for r in rows], jnp.int32),
    positions=jnp.asarray([r[2] for r in rows], jnp.float32),
    text_tokens=jnp.asarray([c[0] for c in captions], jnp.int32),
    text_segment_ids=jnp.asarray([c[1] for c in captions], jnp.int32),
    text_t=jnp.asarray(rng.uniform(0.0, 1.0, (2, LT)), jnp.float32),
  )


def video_of(b) -> VideoTokens:
  """The `VideoTokens` of a flat test batch (``video_*``, ``causal_block``, ``positions``)."""
  return VideoTokens(tokens=b["video_tokens"], t=b["video_t"], segment_ids=b["video_segment_ids"],
                     causal_block=b["causal_block"], positions=b["positions"],
                     temporal_positions=b.get("temporal_positions"))


def text_of(b, *, tokens=True, embeddings=None) -> TextTokens:
  """The `TextTokens` of a flat test batch (byte tokens unless ``tokens=False``)."""
  return TextTokens(segment_ids=b["text_segment_ids"], t=b["text_t"],
                    tokens=b["text_tokens"] if tokens else None, embeddings=embeddings)


def inputs(b):
  """``(video, text)`` of a flat test batch: the MM-DiT's arguments."""
  return video_of(b), text_of(b)


def randomize(model: nnx.Module, scale: float = 0.05, seed: int = 1) -> nnx.Module:
  """Adds noise to every parameter, so zero-initialised gates and outputs become non-zero.

  Uses numpy on the host: eager jax.random per parameter shape is slow to compile on CPU.
  """
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
    lambda p: jnp.asarray(np.asarray(p) + scale * rng.standard_normal(p.shape), p.dtype),
    nnx.state(model, nnx.Param))
  nnx.update(model, params)
  return model


@functools.cache
def _initial(config: models.MMDiTConfig) -> models.MMDiT:
  return models.build_model(config, nnx.Rngs(0))


def build(config: models.MMDiTConfig, randomized: bool = True) -> models.MMDiT:
  """A fresh copy of the (cached) initial model, optionally with randomized parameters."""
  model = nnx.clone(_initial(config))
  return randomize(model) if randomized else model


@nnx.jit
def forward(model, batch):
  return model(*inputs(batch))


@nnx.jit
def forward_embeddings(model, batch, embeddings):
  return model(video_of(batch), text_of(batch, tokens=False, embeddings=embeddings))


@pytest.fixture(scope="module")
def model():
  return build(SMOKE)


@pytest.fixture(scope="module")
def batch():
  return make_batch()


@pytest.fixture(scope="module")
def base_out(model, batch):
  return np.asarray(forward(model, batch))


def _diff(a, b):
  return np.abs(np.asarray(a) - np.asarray(b)).max(axis=-1)  # [B, L]


# Masks of row 0 of the batch.
def _where(batch, row, seg, frame=None):
  m = np.asarray(batch["video_segment_ids"][row]) == seg
  if frame is not None:
    m &= np.asarray(batch["causal_block"][row]) == frame
  return m


def test_make_attention_mask_hand_written():
  # Tokens: [text s1, text s1, text s2, video s1 f0, video s1 f1, video s2 f0, pad].
  seg = jnp.asarray([[1, 1, 2, 1, 1, 2, 0]], jnp.int32)
  frm = jnp.asarray([[-1, -1, -1, 0, 1, 0, 0]], jnp.int32)
  expected = np.array([
    # t1 t1 t2 v10 v11 v20 pad
    [1, 1, 0, 0, 0, 0, 0],  # text s1
    [1, 1, 0, 0, 0, 0, 0],  # text s1
    [0, 0, 1, 0, 0, 0, 0],  # text s2
    [1, 1, 0, 1, 0, 0, 0],  # video s1 f0: own text, own frame
    [1, 1, 0, 1, 1, 0, 0],  # video s1 f1: own text, frames 0 and 1
    [0, 0, 1, 0, 0, 1, 0],  # video s2 f0
    [0, 0, 0, 0, 0, 0, 0],  # padding attends to nothing
  ], bool)
  mask = masks.make_attention_mask(seg, frm, seg, frm)
  assert mask.shape == (1, 1, 7, 7) and mask.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(mask[0, 0]), expected)
  info = masks.MaskInfo.self_attention(seg, frm)
  np.testing.assert_array_equal(np.asarray(info.dense()), np.asarray(mask))


def test_attention_fully_masked_rows_are_zero_and_finite():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(k1, (1, 3, 2, 8))
  k = jax.random.normal(k2, (1, 3, 2, 8))
  v = jax.random.normal(k3, (1, 3, 2, 8))
  info = masks.MaskInfo.self_attention(
    jnp.asarray([[1, 1, 0]], jnp.int32), jnp.asarray([[0, 1, 0]], jnp.int32))

  @jax.jit
  def f(q, k, v):
    return kernels.dot_product_attention(q, k, v, info).sum()

  out = jax.jit(kernels.dot_product_attention)(q, k, v, info)
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(np.asarray(out[0, 2]), 0.0)
  # First query sees only the first key: output equals its value.
  np.testing.assert_allclose(np.asarray(out[0, 0]), np.asarray(v[0, 0]), atol=1e-6)
  grads = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
  assert all(np.all(np.isfinite(g)) for g in grads)
  with pytest.raises(ValueError):
    kernels.dot_product_attention(q, k, v, info, backend="nope")


def test_segment_helpers():
  seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0]], jnp.int32)
  np.testing.assert_array_equal(
    np.asarray(text.segment_positions(seg)), [[0, 1, 2, 0, 1, 0, 1]])
  values = jnp.arange(7, dtype=jnp.float32)[None, :, None]
  q_seg = jnp.asarray([[2, 1, 0, 3]], jnp.int32)
  np.testing.assert_allclose(
    np.asarray(text.segment_mean(values, q_seg, seg))[0, :, 0], [3.5, 1.0, 0.0, 0.0])


def test_zero_init_output_is_zero(batch):
  out = forward(build(SMOKE, randomized=False), batch)
  np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_output_shape_dtype_finite(model, batch, base_out):
  cfg = model.config
  assert base_out.shape == (2, L, cfg.patch_dim)
  assert base_out.dtype == np.float32
  assert np.all(np.isfinite(base_out))
  pad = np.asarray(batch["video_segment_ids"]) == 0
  np.testing.assert_array_equal(base_out[pad], 0.0)
  assert np.abs(base_out[~pad]).max() > 1e-3


def test_blockwise_causal_later_frame(model, batch, base_out):
  later = _where(batch, 0, 1, frame=2)
  noise = jax.random.normal(jax.random.key(3), batch["video_tokens"].shape[1:])
  tokens = batch["video_tokens"].at[0].add(jnp.where(later[:, None], noise, 0.0))
  video_t = batch["video_t"].at[0].set(jnp.where(later, 0.123, batch["video_t"][0]))
  out = forward(model, {**batch, "video_tokens": tokens, "video_t": video_t})
  d = _diff(out, base_out)
  earlier = _where(batch, 0, 1, frame=0) | _where(batch, 0, 1, frame=1)
  assert d[0][earlier].max() <= 1e-6, d[0][earlier].max()
  assert d[0][later].min() > 1e-4
  assert d[0][_where(batch, 0, 2)].max() <= 1e-6  # Other segment.
  assert d[1].max() <= 1e-6  # Other row.


def test_overlap_head_blends_within_a_frame_only(batch, base_out):
  """The overlapping head: patch-sized outputs; frames, samples and rows stay apart."""
  model = build(dataclasses.replace(SMOKE, output_head="overlap"))
  out = np.asarray(forward(model, batch))
  assert out.shape == base_out.shape and np.all(np.isfinite(out))
  np.testing.assert_array_equal(out[np.asarray(batch["video_segment_ids"]) == 0], 0.0)
  later = _where(batch, 0, 1, frame=2)
  tokens = batch["video_tokens"].at[0].add(jnp.where(later[:, None], 1.0, 0.0))
  d = _diff(forward(model, {**batch, "video_tokens": tokens}), out)
  earlier = _where(batch, 0, 1, frame=0) | _where(batch, 0, 1, frame=1)
  assert d[0][earlier].max() <= 1e-6 and d[0][_where(batch, 0, 2)].max() <= 1e-6
  assert d[0][later].min() > 1e-4 and d[1].max() <= 1e-6


def test_earlier_frame_affects_later(model, batch, base_out):
  first = _where(batch, 0, 1, frame=0)
  tokens = batch["video_tokens"].at[0].add(jnp.where(first[:, None], 1.0, 0.0))
  d = _diff(forward(model, {**batch, "video_tokens": tokens}), base_out)
  assert d[0][_where(batch, 0, 1, frame=2)].min() > 1e-5


def test_other_segment_isolated(model, batch, base_out):
  seg2 = _where(batch, 0, 2)
  tokens = batch["video_tokens"].at[0].add(jnp.where(seg2[:, None], 1.0, 0.0))
  text_tokens, text_seg = _caption((1, "a cat"), (2, "zebra"))
  new = {**batch, "video_tokens": tokens,
         "text_tokens": batch["text_tokens"].at[0].set(jnp.asarray(text_tokens)),
         "text_segment_ids": batch["text_segment_ids"].at[0].set(jnp.asarray(text_seg))}
  d = _diff(forward(model, new), base_out)
  assert d[0][_where(batch, 0, 1)].max() <= 1e-6
  assert d[0][seg2].min() > 1e-4


def test_text_conditions_its_segment(model, batch, base_out):
  text_tokens, text_seg = _caption((1, "a dog"), (2, ""))
  np.testing.assert_array_equal(text_seg, np.asarray(batch["text_segment_ids"][0]))
  new = {**batch, "text_tokens": batch["text_tokens"].at[0].set(jnp.asarray(text_tokens))}
  d = _diff(forward(model, new), base_out)
  assert d[0][_where(batch, 0, 1)].min() > 1e-5
  assert d[0][_where(batch, 0, 2)].max() <= 1e-6
  assert d[1].max() <= 1e-6


def test_per_token_noise_level_matters(model, batch, base_out):
  idx = 9  # Segment 1, frame 2.
  video_t = batch["video_t"].at[0, idx].set(1.0 - batch["video_t"][0, idx])
  d = _diff(forward(model, {**batch, "video_t": video_t}), base_out)
  assert d[0, idx] > 1e-4
  assert d[0][_where(batch, 0, 1, frame=0)].max() <= 1e-6


def test_precomputed_text_embeddings(model, batch, base_out):
  emb = jax.random.normal(jax.random.key(5), (2, LT, model.config.text_embed_dim))
  out = np.asarray(forward_embeddings(model, batch, emb))
  assert out.shape == base_out.shape and np.all(np.isfinite(out))
  seg1_text = np.asarray(batch["text_segment_ids"][0]) == 1
  emb2 = emb.at[0].add(jnp.where(jnp.asarray(seg1_text)[:, None], 1.0, 0.0))
  d = _diff(forward_embeddings(model, batch, emb2), out)
  assert d[0][_where(batch, 0, 1)].min() > 1e-5
  assert d[0][_where(batch, 0, 2)].max() <= 1e-6
  with pytest.raises(ValueError):
    model(video_of(batch), text_of(batch, embeddings=emb))  # Both tokens and embeddings.
  only_emb = nnx.eval_shape(lambda: models.build_model(
    models.model_config("smoke", text_depth=0, text_embed_dim=24), nnx.Rngs(0)))
  assert only_emb.text_encoder is None
  with pytest.raises(ValueError):
    only_emb(*inputs(batch))  # No byte encoder for text_tokens.


def test_every_param_has_logical_names(model):
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var.ndim, (path, names, var.shape)
    assert not (set(names) - set(axes.PARAM_AXES) - {None}), (path, names)


def test_logical_constraints_on_a_mesh(model, batch, base_out):
  rules = (
    ("activation_batch", ("data", "fsdp")), ("activation_length", "sequence"),
    ("activation_embed", None), ("activation_heads", "tensor"), ("activation_kv", None),
    ("activation_mlp", "tensor"), ("embed", "fsdp"), ("mlp", "tensor"),
    ("heads", "tensor"), ("kv", None), ("vocab", "tensor"), ("norm", None),
  )
  mesh = jax.make_mesh(
    (1, 1, 1, 1), ("data", "fsdp", "tensor", "sequence"),
    axis_types=(jax.sharding.AxisType.Auto,) * 4)
  assert models.logical_to_mesh_axes(("activation_batch", "embed", "mlp"), rules) == (
    jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor"))
  apply = lambda s, b: nnx.merge(*s)(*inputs(b))  # noqa: E731
  assert "sharding_constraint" not in str(jax.make_jaxpr(apply)(nnx.split(model), batch))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    assert "sharding_constraint" in str(jax.make_jaxpr(apply)(nnx.split(model), batch))
    out = jax.jit(apply)(nnx.split(model), batch)
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  np.testing.assert_allclose(np.asarray(out), base_out, atol=1e-6)
  fc1 = specs["blocks"][0]["video"]["mlp"]["fc1"]["kernel"]
  assert fc1.get_value() == jax.sharding.PartitionSpec("fsdp", "tensor")


def _eqns(jaxpr):
  """Every equation of a jaxpr, those of nested jaxprs (jit, scan, remat, cond) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):  # ClosedJaxpr
          yield from _eqns(sub.jaxpr)
        elif hasattr(sub, "eqns"):
          yield from _eqns(sub)


def _with_params(config: models.MMDiTConfig, params) -> models.MMDiT:
  """A model of `config` holding `params` (unstacked layout), built without running any init."""
  abstract = nnx.eval_shape(lambda: models.build_model(config, nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(state, stacking.stack_layers(params) if config.scan_layers else params)
  return nnx.merge(graphdef, state)


def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_bfloat16_compute(model, batch, base_out):
  """bfloat16 matmuls/activations; float32 params, statistics, logits, RoPE, output, grads.

  Tolerance: bfloat16 keeps 8 significant bits (relative rounding 2^-9, about 0.2%); through the
  two blocks of the smoke model the output differs from float32 by about 0.6% (relative L2). We
  allow 2% relative L2 and a max abs error of 3% of the output's largest magnitude.
  """
  bf16 = _with_params(dataclasses.replace(SMOKE, dtype="bfloat16"), _params(model))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  out = np.asarray(forward(bf16, batch))
  assert out.dtype == np.float32 and np.all(np.isfinite(out))
  rel_l2 = np.linalg.norm(out - base_out) / np.linalg.norm(base_out)
  max_err = np.abs(out - base_out).max()
  print(f"\nbfloat16 vs float32: rel. L2 {rel_l2:.2e}, max abs {max_err:.2e} "
        f"(output scale {np.abs(base_out).max():.2f})")
  assert rel_l2 < 2e-2 and max_err < 3e-2 * np.abs(base_out).max()
  grads = nnx.jit(nnx.grad(lambda m, b: jnp.mean(m(*inputs(b)) ** 2)))(bf16, batch)
  for g in jax.tree.leaves(grads):
    assert g.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(g)))
  # Where each precision is used: only the final layer's two matmuls take float32 operands;
  # softmax (exp), norm statistics (rsqrt) and RoPE / sinusoidal angles (sin, cos) are float32.
  graphdef, state = nnx.split(bf16)
  jaxpr = jax.make_jaxpr(lambda s, b: nnx.merge(graphdef, s)(*inputs(b)))(state, batch).jaxpr
  dots = collections.Counter()
  for eqn in _eqns(jaxpr):
    if eqn.primitive.name == "dot_general":
      dots[str(eqn.invars[0].aval.dtype)] += 1
    elif eqn.primitive.name in ("exp", "rsqrt", "sin", "cos"):
      assert eqn.invars[0].aval.dtype == jnp.float32, eqn
  assert dots["float32"] == 2 and dots["bfloat16"] > 20, dots


# -- stacked (scanned) layers and rematerialisation ------------------------------------------------

DEEP = dataclasses.replace(SMOKE, depth=3)  # the scan runs over 2 stacked blocks
RULES = (
  ("activation_batch", ("data", "fsdp")), ("activation_length", "sequence"),
  ("activation_embed", None), ("activation_heads", "tensor"), ("activation_kv", None),
  ("activation_mlp", "tensor"), ("embed", "fsdp"), ("mlp", "tensor"),
  ("heads", "tensor"), ("kv", None), ("vocab", "tensor"), ("norm", None), ("layers", None),
)


def _scanned(config: models.MMDiTConfig, **overrides) -> models.MMDiTConfig:
  return dataclasses.replace(config, scan_layers=True, **overrides)


@functools.cache
def _deep_params():
  """Random parameters of DEEP (unstacked layout) drawn on the host, so no init is compiled.

  Norm scales are 1 + noise, everything else noise (scale 0.05).
  """
  abstract = nnx.eval_shape(lambda: models.build_model(DEEP, nnx.Rngs(0)))
  rng = np.random.default_rng(2)
  state = nnx.state(abstract, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    value = 0.05 * rng.standard_normal(var.shape) + (path[-1] == "scale")
    var.set_value(jnp.asarray(value, var.dtype))
  return nnx.to_pure_dict(state)


def test_scan_layers_layout_and_logical_names():
  scanned = _initial(_scanned(DEEP))
  n = DEEP.depth - 1
  for path, var in nnx.to_flat_state(nnx.state(scanned, nnx.Param)):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var.ndim, (path, names, var.shape)
    if path[0] == "blocks":
      assert names[0] == axes.LAYER_AXIS and var.shape[0] == n, (path, names, var.shape)
      names = names[1:]
    assert not (set(names) - set(axes.PARAM_AXES) - {None}), (path, names)
  # Each stacked block has its own random init.
  kernel = np.asarray(scanned.blocks.video.mlp.fc1.kernel[...])
  assert np.abs(kernel[0] - kernel[1]).max() > 1e-2
  assert scanned.last_block.text.pre_only and not scanned.blocks.text.pre_only
  # Same parameter count; stack_layers / unstack_layers map one layout onto the other.
  abstract = nnx.eval_shape(lambda: models.build_model(DEEP, nnx.Rngs(0)))
  assert models.count_params(scanned) == models.count_params(abstract)
  unrolled = _params(abstract)
  shapes = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)
  assert shapes(jax.eval_shape(stacking.stack_layers, unrolled)) == shapes(_params(scanned))
  assert shapes(jax.eval_shape(stacking.unstack_layers, _params(scanned))) == shapes(unrolled)
  with nnx.logical_axis_rules(RULES):
    specs = nnx.get_partition_spec(nnx.state(scanned, nnx.Param))
  P = jax.sharding.PartitionSpec
  assert specs["blocks"]["video"]["mlp"]["fc1"]["kernel"].get_value() == P(None, "fsdp", "tensor")
  assert specs["last_block"]["video"]["mlp"]["fc1"]["kernel"].get_value() == P("fsdp", "tensor")


def test_scan_layers_matches_unrolled(batch):
  """Same parameters in both layouts: equal `__call__`, and `encode_context` + `decode`.

  The scanned model (with remat) runs as the sampler runs it: merged under `jax.jit` and called
  inside a loop, on a mesh with logical rules (sharding constraints inside the scan body).
  """
  scanned = _with_params(
    _scanned(DEEP, text_time_conditioning=False, remat_policy="full"), _deep_params())
  unrolled = _with_params(dataclasses.replace(DEEP, text_time_conditioning=False), _deep_params())
  full = np.asarray(forward(unrolled, batch))
  graphdef, state = nnx.split(scanned)

  @jax.jit
  def in_loop(state, batch):
    model = nnx.merge(graphdef, state)
    return jax.lax.fori_loop(0, 1, lambda i, out: model(*inputs(batch)), jnp.zeros(full.shape))

  mesh = jax.make_mesh(
    (1, 1, 1, 1), ("data", "fsdp", "tensor", "sequence"),
    axis_types=(jax.sharding.AxisType.Auto,) * 4)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
    np.testing.assert_allclose(np.asarray(in_loop(state, batch)), full, atol=1e-6)
  new = np.arange(8, 12)  # frame 2 of segment 1 in both rows
  old = np.setdiff1d(np.arange(L), new)
  context_fields = ("video_tokens", "video_t", "video_segment_ids", "causal_block", "positions")
  context = nnx.jit(lambda m, b: m.encode_context(*inputs(b)))(
    scanned, {k: (v[:, old] if k in context_fields else v) for k, v in batch.items()})
  keys, values = context.stacked_kv
  heads = (DEEP.num_heads, DEEP.head_dim)
  assert keys.shape == values.shape == (DEEP.depth - 1, 2, LT + len(old), *heads)
  assert len(context.kv) == 1
  decoded = nnx.jit(lambda m, b, c: m.decode(video_of(b), c))(
    scanned, {k: batch[k][:, new] for k in context_fields}, context)
  np.testing.assert_allclose(decoded, full[:, new], atol=1e-5)


def _lowered_size(config: models.MMDiTConfig, batch) -> int:
  abstract = nnx.eval_shape(lambda: models.build_model(config, nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  apply = lambda s, b: nnx.merge(graphdef, s)(*inputs(b))
  return len(jax.jit(apply).lower(state, batch).as_text())


def test_scan_layers_program_size_flat_in_depth(batch):
  """The lowered program grows with depth unrolled, and stays the same size with a scan."""
  size = {(scan, depth): _lowered_size(
            dataclasses.replace(SMOKE, depth=depth, scan_layers=scan), batch)
          for scan in (False, True) for depth in (4, 8)}
  print(f"\nlowered StableHLO characters, depth 4 -> 8: unrolled {size[False, 4]} -> "
        f"{size[False, 8]}, scanned {size[True, 4]} -> {size[True, 8]}")
  assert abs(size[True, 8] - size[True, 4]) <= 0.01 * size[True, 4]
  assert size[False, 8] > 1.5 * size[False, 4]
  assert size[True, 8] < size[False, 4]


@functools.cache
def _remat_run(scan: bool, policy: str):
  """Gradient of a mean-square loss (unstacked layout) and the compiled temp size in bytes."""
  config = dataclasses.replace(DEEP, scan_layers=scan, remat_policy=policy)
  model = _with_params(config, _deep_params())
  graphdef, state = nnx.split(model)
  batch = make_batch()
  loss = lambda s, b: jnp.mean(nnx.merge(graphdef, s)(*inputs(b)) ** 2)
  compiled = jax.jit(jax.grad(loss)).lower(state, batch).compile()
  grads = jax.tree.map(np.asarray, nnx.to_pure_dict(compiled(state, batch)))
  memory = compiled.memory_analysis()
  temp = None if memory is None else memory.temp_size_in_bytes
  return (stacking.unstack_layers(grads) if scan else grads), temp


def _remat_policies(config: models.MMDiTConfig, batch) -> list:
  """The checkpoint policies found in the jaxpr of the forward pass."""
  graphdef, state = nnx.split(
    nnx.eval_shape(lambda: models.build_model(config, nnx.Rngs(0))))
  jaxpr = jax.make_jaxpr(lambda s, b: nnx.merge(graphdef, s)(*inputs(b)))(state, batch).jaxpr
  return [e.params["policy"] for e in _eqns(jaxpr) if "policy" in e.params]


# Scanned "full" and "dots" against unrolled "none" also check the scanned backward pass itself.
@pytest.mark.parametrize("scan,policy", [(False, "full"), (True, "full"), (True, "dots")])
def test_remat_gradients_match(scan, policy):
  reference, _ = _remat_run(False, "none")
  grads, _ = _remat_run(scan, policy)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads, reference)


def test_remat_lowers_memory_and_is_applied(batch):
  """With a scan, "full" keeps less in memory than "none" (compiled temp bytes, CPU).

  Unrolled, XLA:CPU schedules the recomputation early, so the temp size does not drop there;
  that the policy is applied is checked on the jaxpr instead.
  """
  temps = {policy: _remat_run(True, policy)[1] for policy in stacking.REMAT_POLICY_NAMES}
  print(f"\ncompiled temp bytes (scanned, depth {DEEP.depth}): {temps}")
  if temps["none"] is not None:
    assert temps["full"] < temps["none"] and temps["dots"] < temps["none"]
  for scan in (False, True):
    for policy in stacking.REMAT_POLICY_NAMES:
      policies = _remat_policies(
        dataclasses.replace(DEEP, scan_layers=scan, remat_policy=policy), batch)
      # One per block: unrolled every block, scanned the scan body and the last block.
      expected = 0 if policy == "none" else (2 if scan else DEEP.depth)
      assert len(policies) == expected, (scan, policy, len(policies))
      assert all(p is stacking.remat_policy(policy) for p in policies)
  with pytest.raises(ValueError, match="known"):
    nnx.eval_shape(lambda: models.build_model(
      dataclasses.replace(SMOKE, remat_policy="everything"), nnx.Rngs(0)))


def test_build_from_name_or_mapping():
  by_name = nnx.eval_shape(lambda: models.build_model("smoke", nnx.Rngs(0)))
  by_map = nnx.eval_shape(
    lambda: models.build_model({"variant": "smoke", "depth": 3}, nnx.Rngs(0)))
  assert len(by_map.blocks) == 3 and len(by_name.blocks) == 2
  per_block = models.count_params(by_map.blocks[0])
  assert models.count_params(by_map) > models.count_params(by_name) + 0.5 * per_block
  with pytest.raises(ValueError):
    models.model_config("XXL")


def test_2b_parameter_count():
  cfg = models.model_config("2B")
  start = time.perf_counter()
  abstract = nnx.eval_shape(lambda: models.MMDiT(cfg, rngs=nnx.Rngs(0)))
  n = models.count_params(abstract)
  n_text = models.count_params(abstract.text_encoder)
  print(f"\n2B MM-DiT: {n:,} parameters ({n_text:,} in the byte text encoder); "
        f"eval_shape {time.perf_counter() - start:.1f}s")
  assert 1.5e9 < n < 2.6e9
  assert models.count_params(nnx.split(abstract)[1]) == n


@pytest.mark.parametrize("text_time_conditioning,output_head",
                         [(True, "patch"), (False, "patch"), (False, "overlap")])
def test_cached_context_decode_equals_full_forward(batch, text_time_conditioning, output_head):
  """encode_context on captions + history, then decode of the last unit == the full forward."""
  config = dataclasses.replace(
    SMOKE, text_time_conditioning=text_time_conditioning, output_head=output_head)
  model = build(config)
  full = np.asarray(forward(model, batch))
  new = np.arange(8, 12)  # frame 2 of segment 1 in both rows
  old = np.setdiff1d(np.arange(L), new)
  context_fields = ("video_tokens", "video_t", "video_segment_ids", "causal_block", "positions")
  context = nnx.jit(lambda m, b: m.encode_context(*inputs(b)))(
    model, {k: (v[:, old] if k in context_fields else v) for k, v in batch.items()})
  decoded = nnx.jit(lambda m, b, c: m.decode(video_of(b), c))(
    model, {k: batch[k][:, new] for k in context_fields}, context)
  np.testing.assert_allclose(decoded, full[:, new], atol=1e-5)
  # A clean-conditioned caption makes the context independent of the sampling time.
  shifted = dict(batch, text_t=batch["text_t"] * 0.5)
  changed = _diff(forward(model, shifted), full)[:, new].max()
  assert (changed == 0.0) == (not text_time_conditioning)


def test_t5_sequence_clip_pooled_and_latent_tokens(batch):
  """The SD3 inputs: a frozen encoder's token features (`text_embed_dim`) with its mask (text
  segment ids), a pooled embedding per segment (`pooled_embed_dim`), and latent-channel video
  tokens (patch 2 on 16 channels: 64 features). Each segment's pooled embedding reaches its own
  video tokens only."""
  config = models.model_config("smoke", text_depth=0, text_embed_dim=24, pooled_embed_dim=20,
                               channels=16, patch_size=2)
  model = randomize(models.build_model(config, nnx.Rngs(0)))
  b = dict(batch)
  b["video_tokens"] = jax.random.normal(jax.random.key(7), b["video_tokens"].shape[:2] + (64,))
  emb = jax.random.normal(jax.random.key(5), (2, LT, 24))
  pooled = jax.random.normal(jax.random.key(6), (2, 20))[:, None, :] * jnp.ones((1, LT, 1))

  def run(pooled):
    return np.asarray(model(video_of(b), TextTokens(segment_ids=b["text_segment_ids"],
                                                    t=b["text_t"], embeddings=emb,
                                                    pooled=pooled)))

  out = run(pooled)
  assert out.shape == b["video_tokens"].shape and np.all(np.isfinite(out))
  seg1_text = jnp.asarray(np.asarray(b["text_segment_ids"][0]) == 1)[:, None]
  d = _diff(run(pooled.at[0].add(jnp.where(seg1_text, 1.0, 0.0))), out)
  assert d[0][_where(b, 0, 1)].min() > 1e-6
  assert d[0][_where(b, 0, 2)].max() <= 1e-6
  with pytest.raises(ValueError, match="pooled"):
    run(None)
