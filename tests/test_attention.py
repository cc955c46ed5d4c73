"""Tests of pfm.models.masks and pfm.models.kernels: the metadata mask and every attention backend
against a float64 numpy reference, in value and gradient, on packed batches with padding and
Lq != Lk."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfm.models import kernels, masks

H, D = 2, 32
SCALE = D**-0.5


# ----------------------------------------------------------------------------- mask construction

# One packed row: segment 1 has two text tokens, history frames 0 and 1 and a current unit 2 of
# two tokens; segment 2 has one text token and frames 0 and 1; then one padding token.
SEG = [1, 1, 2, 1, 1, 1, 1, 2, 2, 0]
FRM = [-1, -1, -1, 0, 1, 2, 2, 0, 1, 0]
EXPECTED = np.array([
  # t1 t1 t2 f0 f1 f2 f2 g0 g1 pad  (f: segment 1 frames, g: segment 2 frames)
  [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # text s1: its own segment's text only
  [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # text s1
  [0, 0, 1, 0, 0, 0, 0, 0, 0, 0],  # text s2
  [1, 1, 0, 1, 0, 0, 0, 0, 0, 0],  # s1 frame 0: text and frame 0
  [1, 1, 0, 1, 1, 0, 0, 0, 0, 0],  # s1 frame 1: text, frames 0 and 1
  [1, 1, 0, 1, 1, 1, 1, 0, 0, 0],  # s1 current unit 2: text, history, whole own unit
  [1, 1, 0, 1, 1, 1, 1, 0, 0, 0],  # s1 current unit 2
  [0, 0, 1, 0, 0, 0, 0, 1, 0, 0],  # s2 frame 0
  [0, 0, 1, 0, 0, 0, 0, 1, 1, 0],  # s2 frame 1
  [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # padding attends to nothing
], bool)


def test_mask_hand_built_packed_row():
  seg, frm = jnp.asarray([SEG], jnp.int32), jnp.asarray([FRM], jnp.int32)
  mask = masks.make_attention_mask(seg, frm, seg, frm)
  assert mask.shape == (1, 1, 10, 10) and mask.dtype == jnp.bool_
  got = np.asarray(mask[0, 0])
  for i in range(10):
    for j in range(10):
      assert got[i, j] == EXPECTED[i, j], (i, j)
  np.testing.assert_array_equal(
    np.asarray(masks.MaskInfo.self_attention(seg, frm).dense()), np.asarray(mask))


def test_mask_queries_differ_from_keys():
  # Decoding the current unit of segment 1 and frame 1 of segment 2 against the cached row;
  # segment 3 is absent from the keys and padding is present in the queries.
  q_seg = jnp.asarray([[1, 1, 2, 3, 0]], jnp.int32)
  q_frm = jnp.asarray([[2, 2, 1, 0, 0]], jnp.int32)
  info = masks.MaskInfo(
    q_seg, q_frm, jnp.asarray([SEG], jnp.int32), jnp.asarray([FRM], jnp.int32))
  mask = np.asarray(info.dense())
  assert mask.shape == (1, 1, 5, 10)
  expected = np.stack([EXPECTED[5], EXPECTED[6], EXPECTED[8], np.zeros(10, bool),
                       np.zeros(10, bool)])
  np.testing.assert_array_equal(mask[0, 0], expected)
  # Fused kernels see key 0 in rows without keys, and those rows are reported empty.
  kernel_mask, has_key = masks.open_empty_rows(info)
  expected[3:, 0] = True
  np.testing.assert_array_equal(np.asarray(kernel_mask[0, 0]), expected)
  np.testing.assert_array_equal(np.asarray(has_key), [[True, True, True, False, False]])


# ----------------------------------------------------------------------------- reference


def reference(q, k, v, allowed, cot):
  """float64 masked softmax attention and its gradient for the loss sum(out * cot).

  q [B, Lq, H, D], k and v [B, Lk, H, D], allowed bool [B, 1, Lq, Lk], cot [B, Lq, H, D].
  Rows without a visible key give zero output. Returns out, (dq, dk, dv).
  """
  q, k, v, cot = (np.asarray(x, np.float64) for x in (q, k, v, cot))
  allowed = np.asarray(allowed)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * SCALE
  s = np.where(allowed, s, -np.inf)
  row_max = np.max(s, axis=-1, keepdims=True)
  row_max = np.where(np.isfinite(row_max), row_max, 0.0)
  e = np.where(allowed, np.exp(s - row_max), 0.0)
  denom = e.sum(-1, keepdims=True)
  p = np.where(denom > 0, e / np.where(denom > 0, denom, 1.0), 0.0)
  out = np.einsum("bhqk,bkhd->bqhd", p, v)
  dp = np.einsum("bqhd,bkhd->bhqk", cot, v)
  dv = np.einsum("bhqk,bqhd->bkhd", p, cot)
  ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
  dq = np.einsum("bhqk,bkhd->bqhd", ds, k) * SCALE
  dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * SCALE
  return out, (dq, dk, dv)


def _packed_row(rng, length):
  """Segment ids and frames of one packed row: 1-3 samples (text at frame -1, then 1-4 frame
  units each) filling 60-90% of the row, padding after."""
  content = int(rng.integers(int(0.6 * length), int(0.9 * length)))
  num_segments = int(rng.integers(1, 4))
  sizes = np.maximum(rng.multinomial(content - 4 * num_segments, [1 / num_segments] *
                                     num_segments) + 4, 4)
  seg, frm = [], []
  for s, size in enumerate(sizes, start=1):
    num_text = int(rng.integers(1, max(2, size // 3)))
    num_frames = int(rng.integers(1, 5))
    video = size - num_text
    seg += [s] * size
    frm += [-1] * num_text + [int(i * num_frames // video) for i in range(video)]
  pad = length - len(seg)
  return np.array(seg + [0] * pad, np.int32), np.array(frm + [0] * pad, np.int32)


def _case(kind, seed, lk):
  """Random packed metadata and q, k, v, cotangent: "self" (Lq = Lk) or "cross" (queries are each
  sample's text and one of its frame units, plus a sample absent from the keys, and padding;
  Lq = 0.35 Lk, odd)."""
  rng = np.random.default_rng(seed)
  batch = 2
  rows = [_packed_row(rng, lk) for _ in range(batch)]
  kv_seg = np.stack([r[0] for r in rows])
  kv_frm = np.stack([r[1] for r in rows])
  if kind == "self":
    q_seg, q_frm = kv_seg, kv_frm
  else:
    lq = int(0.35 * lk) | 1  # Odd: the cudnn wrapper pads it.
    q_seg = np.zeros((batch, lq), np.int32)
    q_frm = np.zeros((batch, lq), np.int32)
    for b in range(batch):
      # Per sample: its text and one frame unit, not its last where it has several.
      idx = []
      for s in np.unique(kv_seg[b][kv_seg[b] > 0]):
        frames = np.unique(kv_frm[b][(kv_seg[b] == s) & (kv_frm[b] >= 0)])
        unit = rng.choice(frames[:-1] if len(frames) > 1 else frames)
        idx += [i for i in range(lk) if kv_seg[b, i] == s and kv_frm[b, i] in (-1, unit)]
      idx = idx[:lq - 8]
      q_seg[b, :len(idx)], q_frm[b, :len(idx)] = kv_seg[b, idx], kv_frm[b, idx]
      q_seg[b, len(idx):len(idx) + 3] = 9  # No key carries segment 9.
  info = masks.MaskInfo(*(jnp.asarray(x) for x in (q_seg, q_frm, kv_seg, kv_frm)))
  keys = jax.random.split(jax.random.key(seed), 4)
  lq = q_seg.shape[1]
  q = jax.random.normal(keys[0], (batch, lq, H, D))
  k = jax.random.normal(keys[1], (batch, lk, H, D))
  v = jax.random.normal(keys[2], (batch, lk, H, D))
  cot = jax.random.normal(keys[3], (batch, lq, H, D))
  return q, k, v, info, cot


# ----------------------------------------------------------------------------- backends

ON = jax.default_backend()


def _cudnn():
  if ON not in kernels.BACKEND_PLATFORMS["cudnn"]:
    pytest.skip(f"cudnn backend needs an NVIDIA GPU; this platform is {ON}")
  return kernels.cudnn_attention, 3e-2, 71


def _splash():
  # Off TPU the same kernel runs in Pallas interpret mode. Blocks of 128 with Lk = 200 (padded
  # to 256) give two key blocks and partly masked, fully visible and skipped blocks.
  return functools.partial(
    kernels.splash_attention, block_q=128, block_kv=128, interpret=ON != "tpu"), 2e-5, 200


BACKENDS = {
  # name -> () -> (fn(q, k, v, mask, *, scale), relative tolerance, Lk); odd lengths check the
  # padding to even lengths of the cudnn wrapper.
  "xla": lambda: (kernels.ATTENTION_BACKENDS["xla"], 2e-5, 71),
  "dot_product": lambda: (kernels.ATTENTION_BACKENDS["dot_product"], 2e-5, 71),
  # The cudnn wrapper's preparation (bfloat16 cast, even lengths) run with the xla kernel.
  "cudnn_wrapper_on_xla": lambda: (functools.partial(
    kernels.jax_nn_attention, implementation="xla", compute_dtype=jnp.bfloat16,
    length_multiple=2), 3e-2, 71),
  "cudnn": _cudnn,
  "splash": _splash,
}


@pytest.mark.parametrize("kind", ["self", "cross"])
@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_backend_matches_float64_reference(name, kind):
  fn, tol, lk = BACKENDS[name]()
  q, k, v, info, cot = _case(kind, len(name) + (kind == "cross"), lk)
  allowed = np.asarray(info.dense())
  empty = ~allowed.any(-1)[:, 0]  # [B, Lq]
  # The case must exercise masking: rows with some keys hidden, rows with none visible.
  assert empty.any() and (~empty).any()
  assert (allowed.any(-1) & ~allowed.all(-1)).sum() > 10

  @jax.jit
  def run(q, k, v, info, cot):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, info, scale=SCALE), q, k, v)
    return out, vjp(cot)

  out, grads = run(q, k, v, info, cot)
  ref_out, ref_grads = reference(q, k, v, allowed, cot)
  assert out.shape == q.shape and out.dtype == v.dtype
  np.testing.assert_allclose(
    np.asarray(out), ref_out, rtol=tol, atol=tol * np.abs(ref_out).max())
  for got, want, what in zip(grads, ref_grads, ("dq", "dk", "dv"), strict=True):
    got = np.asarray(got)
    assert got.dtype == np.float32 and np.all(np.isfinite(got)), what
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max(), err_msg=what)
  # Queries that see no key: exactly zero output and exactly zero gradient.
  assert np.all(np.asarray(out)[empty] == 0.0)
  assert np.all(np.asarray(grads[0])[empty] == 0.0)


def test_dispatch_default_scale_and_unknown_backend():
  q, k, v, info, _ = _case("self", 3, 40)
  got = jax.jit(functools.partial(kernels.dot_product_attention, backend="dot_product"))(
    q, k, v, info)
  np.testing.assert_allclose(
    np.asarray(got), np.asarray(jax.jit(kernels.xla_attention, static_argnames="scale")(
      q, k, v, info, scale=D**-0.5)), atol=1e-5)
  with pytest.raises(ValueError, match="Unknown attention backend"):
    kernels.dot_product_attention(q, k, v, info, backend="flash")


def test_splash_block_sizes():
  assert kernels._splash_block(200, 512) == 256
  assert kernels._splash_block(600, 512) == 128
  assert kernels._splash_block(1024, 512) == 512
  assert kernels._splash_block(70, 128) == 128
  q, k, v, info, _ = _case("self", 0, 40)
  for bad in (100, 384):
    with pytest.raises(ValueError, match="128 times a power of two"):
      kernels.splash_attention(q, k, v, info, scale=SCALE, block_q=bad, interpret=True)


def test_cudnn_rejects_head_dims_it_cannot_run():
  q = jnp.zeros((1, 4, 1, 12))
  info = masks.MaskInfo.self_attention(*(jnp.ones((1, 4), jnp.int32),) * 2)
  with pytest.raises(ValueError, match="multiple of 8"):
    kernels.cudnn_attention(q, q, q, info, scale=1.0)


# ----------------------------------------------------------------------------- check_backend


def test_check_backend():
  for name in ("xla", "dot_product"):
    for platform in ("cpu", "gpu", "tpu"):
      kernels.check_backend(name, platform)
  kernels.check_backend("cudnn", "gpu")
  kernels.check_backend("cudnn", "cuda")
  kernels.check_backend("splash", "tpu")
  kernels.check_backend("xla")
  with pytest.raises(ValueError, match=r"model\.attention='flash'.*choose one of") as err:
    kernels.check_backend("flash", "gpu")
  assert "splash" in str(err.value) and "cudnn" in str(err.value)
  for name, platform, needs in (
    ("cudnn", "cpu", "NVIDIA GPU"), ("cudnn", "tpu", "NVIDIA GPU"), ("cudnn", "rocm", "NVIDIA GPU"),
    ("splash", "cpu", "TPU"), ("splash", "gpu", "TPU"),
  ):
    with pytest.raises(ValueError, match=rf"model\.attention='{name}' needs .*{needs}") as err:
      kernels.check_backend(name, platform)
    assert f"this platform is {platform}" in str(err.value)
  if ON == "cpu":
    with pytest.raises(ValueError, match="this platform is cpu"):
      kernels.check_backend("cudnn")
