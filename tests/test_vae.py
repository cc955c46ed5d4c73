"""The causal video VAE: shapes, causality, exact chunked and approximate tiled processing,
the official layout's channel orders, the posterior and the latent normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pfm.models import vae as vae_lib


@pytest.fixture(scope="module")
def smoke():
  """The smoke VAE: 2x spatial, 2x temporal, 4 latent channels, random weights."""
  return vae_lib.CausalVideoVAE(vae_lib.vae_config("smoke"), rngs=nnx.Rngs(0))


def _pixels(key, shape):
  return jax.random.uniform(jax.random.key(key), shape, minval=-1.0, maxval=1.0)


@pytest.mark.parametrize("frames,latent_frames", [(1, 1), (9, 2), (17, 3), (121, 16)])
def test_released_layout_shapes_at_384p(frames, latent_frames):
  """The released VAE (8x8 spatial, 8x temporal, 16 channels) on 640x384 clips, abstractly:
  1 + 8k frames -> 1 + k latent frames, and back."""
  config = vae_lib.vae_config("pyramid_flow")
  assert (config.spatial_factor, config.temporal_factor, config.latent_channels) == (8, 8, 16)
  model = nnx.eval_shape(lambda: vae_lib.CausalVideoVAE(config, rngs=nnx.Rngs(0)))
  x = jax.ShapeDtypeStruct((1, frames, 384, 640, 3), jnp.float32)
  mean = nnx.eval_shape(lambda m, x: m.encode(x).mean, model, x)
  assert mean.shape == (1, latent_frames, 48, 80, 16)
  out = nnx.eval_shape(lambda m, z: m.decode(z), model, mean)
  assert out.shape == (1, frames, 384, 640, 3)


@pytest.mark.parametrize("frames", [1, 9, 17])
def test_smoke_shapes_computed(smoke, frames):
  x = _pixels(frames, (2, frames, 8, 12, 3))
  posterior = smoke.encode(x)
  assert posterior.mean.shape == (2, 1 + (frames - 1) // 2, 4, 6, 4)
  assert smoke.decode(posterior.mean).shape == x.shape


def test_encoder_is_causal(smoke):
  """Changing frame i changes no latent frame before the one that holds i (latent 0 holds frame
  0; latent j >= 1 holds frames 2j - 1 and 2j) and does change that one."""
  x = _pixels(0, (1, 9, 8, 8, 3))
  base = np.asarray(smoke.encode(x).mean)
  for i in range(9):
    changed = np.asarray(smoke.encode(x.at[:, i].add(0.5)).mean)
    diff = np.abs(changed - base).max(axis=(0, 2, 3, 4))
    holder = (i + 1) // 2
    np.testing.assert_array_equal(diff[:holder], 0.0)
    assert diff[holder] > 1e-3


def test_decoder_is_causal(smoke):
  """Changing latent frame j changes no output frame before 2j - 1 (its first frame)."""
  z = jax.random.normal(jax.random.key(1), (1, 5, 4, 4, 4))
  base = np.asarray(smoke.decode(z))
  for j in range(5):
    changed = np.asarray(smoke.decode(z.at[:, j].add(0.5)))
    diff = np.abs(changed - base).max(axis=(0, 2, 3, 4))
    first = max(2 * j - 1, 0)
    np.testing.assert_array_equal(diff[:first], 0.0)
    assert diff[first] > 1e-3


@pytest.mark.parametrize("window", [2, 4, 6])
def test_chunked_encode_equals_whole(smoke, window):
  """Causal temporal chunks (first 1 + window frames, then window each, the last one shorter)
  carry each convolution's context: the result is the whole clip's to float32 rounding."""
  x = _pixels(3, (1, 13, 8, 8, 3))
  whole, chunked = smoke.encode(x), smoke.encode(x, window=window)
  np.testing.assert_allclose(chunked.mean, whole.mean, atol=1e-5)
  np.testing.assert_allclose(chunked.logvar, whole.logvar, atol=1e-5)


@pytest.mark.parametrize("window", [1, 2, 3])
def test_chunked_decode_equals_whole(smoke, window):
  z = jax.random.normal(jax.random.key(4), (1, 7, 4, 4, 4))
  np.testing.assert_allclose(smoke.decode(z, window=window), smoke.decode(z), atol=1e-5)


def test_blend_tiles_weights():
  """Tiles cover the axis, the last flush with the end; weights are 1 alone, ramp linearly in a
  shared stretch and sum to 1 everywhere."""
  tiles = vae_lib.blend_tiles(20, 8, 4)
  assert [s for s, _ in tiles] == [0, 4, 8, 12]
  total = np.zeros(20)
  for start, w in tiles:
    total[start:start + 8] += np.asarray(w)
  np.testing.assert_allclose(total, 1.0, atol=1e-6)
  first, second = np.asarray(tiles[0][1]), np.asarray(tiles[1][1])
  np.testing.assert_allclose(first[:4], 1.0)
  np.testing.assert_allclose(first[4:], 1 - np.arange(1, 5) / 5)
  np.testing.assert_allclose(second[:4], np.arange(1, 5) / 5)
  # A last tile closer than the step: its shared stretch is longer.
  starts = [s for s, _ in vae_lib.blend_tiles(18, 8, 2)]
  assert starts == [0, 6, 10]
  assert [float(w.sum()) for _, w in vae_lib.blend_tiles(5, 8, 2)] == [5.0]
  with pytest.raises(ValueError, match="overlap"):
    vae_lib.blend_tiles(20, 8, 8)


@pytest.mark.parametrize("scale", [2, 0.5])
def test_tiled_is_exact_for_a_local_map(scale):
  """With a map that acts on each position on its own (nearest up- or down-sampling and a
  pointwise nonlinearity), overlapping tiles agree and the blend gives the whole result."""
  x = _pixels(5, (1, 2, 16, 24, 3))

  def local(t):
    if scale > 1:
      t = jnp.repeat(jnp.repeat(t, 2, axis=2), 2, axis=3)
    else:
      t = t[:, :, ::2, ::2]
    return jnp.tanh(3 * t) + t ** 2

  tile, overlap = (8, 4) if scale > 1 else (8, 4)
  np.testing.assert_allclose(vae_lib.tiled(local, x, tile, overlap, scale), local(x), atol=1e-6)


def test_tiled_decode_approximates_whole(smoke):
  """Tiling is approximate (GroupNorm statistics and attention are per tile, every convolution
  sees the tile border): on stationary random latents with random weights, 32x32 latents in
  24-pixel tiles overlapping by 8 are within 15% relative RMS of the whole decode, and smaller
  tiles are further off."""
  z = jax.random.normal(jax.random.key(2), (1, 2, 32, 32, 4))
  whole = np.asarray(smoke.decode(z))

  def relative_rms(tile, overlap):
    err = np.asarray(smoke.decode(z, tile=tile, tile_overlap=overlap)) - whole
    return np.sqrt((err ** 2).mean() / (whole ** 2).mean())

  large, small = relative_rms(24, 8), relative_rms(16, 8)
  assert large < 0.15
  assert small > large
  assert relative_rms(32, 8) < 1e-6  # one tile: the whole decode


def test_tiled_encode_is_close(smoke):
  x = jax.image.resize(_pixels(6, (1, 3, 8, 8, 3)), (1, 3, 64, 64, 3), "linear")
  whole = np.asarray(smoke.encode(x).mean)
  tiled = np.asarray(smoke.encode(x, tile=48, tile_overlap=16).mean)
  assert np.sqrt(((tiled - whole) ** 2).mean() / (whole ** 2).mean()) < 0.3


def test_depth_to_space_matches_official_channel_order():
  """Channel c * 4 + p1 * 2 + p2 goes to (2h + p1, 2w + p2) and channel c * 2 + p to frame
  2t + p, as `rearrange('b (c p1 p2) t h w -> b c t (h p1) (w p2)')` and
  `rearrange('b (c p) t h w -> b c (t p) h w')` do in channel-first layout."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 2, 3, 4, 3 * 4)).astype(np.float32)  # [B, T, H, W, C * 4]
  out = np.asarray(vae_lib.depth_to_space(jnp.asarray(x), 1, 2))
  for c in range(3):
    for p1 in range(2):
      for p2 in range(2):
        np.testing.assert_array_equal(out[:, :, p1::2, p2::2, c], x[..., c * 4 + p1 * 2 + p2])
  x = rng.normal(size=(1, 3, 2, 2, 5 * 2)).astype(np.float32)
  out = np.asarray(vae_lib.depth_to_space(jnp.asarray(x), 2, 1))
  for c in range(5):
    for p in range(2):
      np.testing.assert_array_equal(out[:, p::2, :, :, c], x[..., c * 2 + p])


def test_frame_group_norm_normalises_each_frame_and_group():
  norm = vae_lib.FrameGroupNorm(8, 4, rngs=nnx.Rngs(0))
  x = np.random.default_rng(1).normal(2.0, 3.0, size=(2, 3, 5, 5, 8)).astype(np.float32)
  x[:, 1] *= 10  # frames with other statistics are normalised on their own
  y = np.asarray(norm(jnp.asarray(x)))
  groups = x.reshape(2, 3, 5, 5, 4, 2)
  mean = groups.mean(axis=(2, 3, 5), keepdims=True)
  var = groups.var(axis=(2, 3, 5), keepdims=True)
  expected = ((groups - mean) / np.sqrt(var + 1e-6)).reshape(x.shape)
  np.testing.assert_allclose(y, expected, atol=1e-4)


def test_frame_attention_matches_reference():
  """Single-head softmax attention over each frame's positions after GroupNorm, plus x."""
  attn = vae_lib.FrameAttention(8, 4, dtype=jnp.float32, param_dtype=jnp.float32,
                                rngs=nnx.Rngs(0))
  x = np.random.default_rng(2).normal(size=(1, 2, 3, 3, 8)).astype(np.float32)
  y = np.asarray(attn(jnp.asarray(x)))
  h = np.asarray(attn.group_norm(jnp.asarray(x))).reshape(2, 9, 8)

  def lin(layer, v):
    return v @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])

  q, k, v = lin(attn.to_q, h), lin(attn.to_k, h), lin(attn.to_v, h)
  logits = q @ k.transpose(0, 2, 1) / np.sqrt(8)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  expected = x + lin(attn.to_out, w @ v).reshape(x.shape)
  np.testing.assert_allclose(y, expected, atol=1e-5)


def test_posterior_sample_kl_and_clamp():
  mean = jnp.array([[0.5, -1.0]])
  logvar = jnp.array([[np.log(0.25), 40.0]])  # 40 is clamped to 20
  moments = jnp.concatenate([mean, logvar], -1)[:, None, None, None, :]  # [1, 1, 1, 1, 4]
  posterior = vae_lib.DiagonalGaussian.from_moments(moments)
  assert float(posterior.logvar.max()) == 20.0
  posterior = vae_lib.DiagonalGaussian.from_moments(
    jnp.concatenate([mean, jnp.log(jnp.array([[0.25, 2.0]]))], -1)[:, None, None, None, :])
  draws = jax.vmap(posterior.sample)(jax.random.split(jax.random.key(0), 200_000))
  draws = np.asarray(draws).reshape(-1, 2)
  np.testing.assert_allclose(draws.mean(0), [0.5, -1.0], atol=0.01)
  np.testing.assert_allclose(draws.var(0), [0.25, 2.0], rtol=0.02)
  # KL(q || N(0, I)) against a Monte Carlo estimate of E_q[log q - log p].
  var = np.array([0.25, 2.0])
  log_q = -0.5 * (((draws - [0.5, -1.0]) ** 2) / var + np.log(2 * np.pi * var)).sum(-1)
  log_p = -0.5 * (draws ** 2 + np.log(2 * np.pi)).sum(-1)
  np.testing.assert_allclose(float(posterior.kl()[0]), (log_q - log_p).mean(), rtol=0.02)


def test_latent_normalisation():
  """The first latent frame uses the image constants, the rest the video ones; denormalize
  inverts normalize."""
  model = nnx.eval_shape(lambda: vae_lib.CausalVideoVAE(vae_lib.vae_config("pyramid_flow"),
                                                         rngs=nnx.Rngs(0)))
  c = model.config
  z = jax.random.normal(jax.random.key(0), (2, 3, 2, 2, 16))
  n = model.normalize(z)
  np.testing.assert_allclose(n[:, 0], (z[:, 0] - 0.1490) / 1.8415, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(n[:, 1:], (z[:, 1:] + 0.2343) / 3.0986, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.denormalize(n), z, atol=1e-5)
  assert (c.image_shift, c.video_shift) == (0.1490, -0.2343)


def test_bad_inputs_and_configs_raise(smoke):
  with pytest.raises(ValueError, match="1 \\+ 2 \\* k frames"):
    smoke.encode(_pixels(0, (1, 4, 8, 8, 3)))
  with pytest.raises(ValueError, match="multiples of 2"):
    smoke.encode(_pixels(0, (1, 3, 7, 8, 3)))
  with pytest.raises(ValueError, match="window"):
    smoke.encode(_pixels(0, (1, 5, 8, 8, 3)), window=3)
  with pytest.raises(ValueError, match="latents must be"):
    smoke.decode(jnp.zeros((1, 2, 4, 4, 3)))
  with pytest.raises(ValueError, match="vae.encoder_layers"):
    vae_lib.vae_config("smoke", encoder_layers=(1,))
  with pytest.raises(ValueError, match="vae.norm_groups"):
    vae_lib.vae_config("smoke", norm_groups=3)
  with pytest.raises(ValueError, match="vae.temporal_up"):
    vae_lib.vae_config("smoke", temporal_up=(False, False))
  with pytest.raises(KeyError, match="unknown VAE variant"):
    vae_lib.vae_config("huge")


@pytest.mark.parametrize("kernel,stride", [((3, 3, 3), (1, 1, 1)), ((3, 3, 3), (2, 1, 1)),
                                           ((3, 3, 3), (1, 2, 2)), ((1, 1, 1), (1, 1, 1))])
def test_causal_conv_equals_a_3d_convolution(kernel, stride):
  """The per-tap sum of 2-D convolutions equals one 3-D convolution of the front-padded clip
  (zeros: k_t - 1 frames), with the same kernel layout [kt, kh, kw, in, out]."""
  conv = vae_lib.CausalConv3d(5, 6, kernel, stride, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 7, 8, 8, 5))
  padded = jnp.pad(x, ((0, 0), (kernel[0] - 1, 0), (0, 0), (0, 0), (0, 0)))
  expected = jax.lax.conv_general_dilated(
    padded, conv.conv.kernel[...], stride, ((0, 0), (kernel[1] // 2,) * 2, (kernel[2] // 2,) * 2),
    dimension_numbers=("NDHWC", "DHWIO", "NDHWC")) + conv.conv.bias[...]
  np.testing.assert_allclose(conv(x, vae_lib.TemporalContext()), expected, atol=1e-5)


def test_logvar_init_starts_the_posterior_narrow():
  """`logvar_init` sets the log-variance bias of quant_conv: the initial posterior's log-variance
  is centred there (the mean half is untouched)."""
  base = vae_lib.CausalVideoVAE(vae_lib.vae_config("smoke"), rngs=nnx.Rngs(0))
  narrow = vae_lib.CausalVideoVAE(vae_lib.vae_config("smoke", logvar_init=-6.0), rngs=nnx.Rngs(0))
  x = _pixels(8, (1, 3, 8, 8, 3))
  p0, p1 = base.encode(x), narrow.encode(x)
  np.testing.assert_allclose(p1.logvar - p0.logvar, -6.0, atol=1e-5)
  np.testing.assert_allclose(p1.mean, p0.mean, atol=1e-6)
