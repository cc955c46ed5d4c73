"""Numerical tests of stage-wise diffusion for any pyramid block and both diffusion schedules.

Covers TPDiff (Ran & Shou) Secs. 3.3-3.6 and Appendix A.1 and Pyramidal Flow Appendix A, in the
project's convention (t = 0 noise, t = 1 data): the schedules, temporal resampling, the block
noise, renoising at jump points, the jump relation, the DDIM stage path (Eqs. 10-11), the exact
samplers, stage-consistent RoPE positions (Eq. 14) and ``make_pyramid``.

Statistical tolerances. For N i.i.d. draws of a Gaussian vector with covariance C, the empirical
mean of element i has standard error sqrt(C_ii / N) and the empirical covariance entry (i, j) has
standard error sqrt((C_ii C_jj + C_ij^2) / N) <= sqrt(2 / N) once normalised to unit variance.
The checks compare every entry of a covariance matrix of up to 128 x 128 (about 8 * 10^3
distinct entries) at once; the largest of 10^4 standard normals is about 4 standard errors, so
the tolerances are 6 standard errors (a false failure has probability below 10^-4 per test; the
seeds are fixed, so the tests are deterministic). That is 0.019 for the block noise (N = 200k)
and 0.027 for the renoised starts (N = 100k), while the smallest effects the tests must see are
the in-block correlation -1/14 = -0.071 of a 2x2x2 block at half its minimum gamma and the
missing variance 1 - 1/m >= 1/2 of a jump without corrective noise.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfm.pyramid import paths, renoise, resample, samplers, stages, windows
from pfm.pyramid import schedules as schedules_lib

FM = schedules_lib.FlowMatching()
VP = schedules_lib.VariancePreserving()
DIFFUSIONS = ("flow_matching", "ddim")

# (spatial, temporal) upsampling factors of one jump and the block size m = spatial^2 * temporal.
BLOCKS = [(2, 1), (1, 2), (2, 2), (1, 4)]
BLOCK_IDS = ["2x2_m4", "t2_m2", "2x2x2_m8", "t4_m4"]
SQRT2 = math.sqrt(2.0)


def n_sigma_tol(num: int, n_sigma: float = 6.0, var: float = 2.0) -> float:
  """n_sigma standard errors of an empirical (co)variance entry of unit-variance data."""
  return n_sigma * math.sqrt(var / num)


def make(num_stages: int, block, diffusion: str = "flow_matching", **kwargs) -> stages.Pyramid:
  """A pyramid whose every jump has the given (spatial, temporal) block."""
  spatial, temporal = block
  return stages.make_pyramid(num_stages, spatial=spatial == 2,
                             frame_rate_schedule=str(temporal) if temporal > 1 else "",
                             diffusion=diffusion, **kwargs)


def full_shape(pyramid: stages.Pyramid, stage_shape, k: int):
  """The full-size [T, H, W, C] whose stage-k size is ``stage_shape``."""
  t, h, w, c = stage_shape
  fs, ft = pyramid.spatial_factors[k], pyramid.temporal_factors[k]
  return (t * ft, h * fs, w * fs, c)


def uniform_video(seed: int, shape) -> jax.Array:
  """A fixed clean video in [-1, 1] (NumPy's generator: nothing to compile)."""
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape), jnp.float32)


def normal(seed: int, shape) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def fast_key(seed: int):
  """A PRNG key for the code under test whose normals compile in a fraction of the default
  threefry's time (about 0.2 s instead of 0.9 s per shape on CPU); same maths, other bits."""
  return jax.random.key(seed, impl="rbg")


def rho(schedule, t):
  """Noise-to-signal ratio straight from the coefficients (not schedule.noise_to_signal)."""
  return float(schedule.noise(float(t))) / float(schedule.signal(float(t)))


# --- a. schedules -------------------------------------------------------------------------------


def test_schedule_coefficients():
  t = np.linspace(0.0, 1.0, 101)
  np.testing.assert_allclose(VP.signal(t) ** 2 + VP.noise(t) ** 2, 1.0, atol=1e-12)
  np.testing.assert_allclose(VP.alpha_bar(t), VP.signal(t) ** 2, atol=1e-12)
  np.testing.assert_allclose(FM.signal(t) + FM.noise(t), 1.0, atol=1e-12)
  np.testing.assert_allclose(FM.signal(t), t)
  # VP end points: alpha_bar_0 = min_alpha_bar (a little signal at the noisy end), sigma_1 = 0.
  assert float(VP.alpha_bar(0.0)) == pytest.approx(VP.min_alpha_bar, rel=1e-9)
  assert float(VP.signal(1.0)) == pytest.approx(1.0, abs=1e-12)
  assert float(VP.noise(1.0)) == pytest.approx(0.0, abs=1e-12)
  assert float(VP.noise(jnp.asarray(1.0, jnp.float32))) == pytest.approx(0.0, abs=1e-7)
  assert schedules_lib.VariancePreserving(0.01).alpha_bar(0.0) == pytest.approx(0.01, rel=1e-9)
  for sched in (FM, VP):  # signal up, noise and noise-to-signal down, strictly
    assert np.all(np.diff(sched.signal(t)) > 0)
    assert np.all(np.diff(sched.noise(t)) < 0)
    assert np.all(np.diff(sched.noise_to_signal(t[1:])) < 0)
  # The jnp path (also under jit) agrees with the float64 NumPy path.
  for sched in (FM, VP):
    for fn in (sched.signal, sched.noise, sched.noise_to_signal):
      tj = jnp.asarray(t[1:], jnp.float32)
      out = jax.jit(fn)(tj)
      assert isinstance(out, jax.Array)
      np.testing.assert_allclose(out, fn(t[1:]), rtol=2e-5, atol=2e-6)
  assert schedules_lib.get_schedule("ddim") == VP
  assert schedules_lib.get_schedule("flow_matching") == FM
  with pytest.raises(ValueError):
    schedules_lib.get_schedule("edm")


@pytest.mark.parametrize("sched", [FM, VP], ids=DIFFUSIONS)
def test_noise_to_signal_and_time_at_are_inverses(sched):
  t = np.linspace(0.01, 1.0, 50)
  r = sched.noise_to_signal(t)
  np.testing.assert_allclose(sched.time_at(r), t, atol=1e-10)
  for x in (0.05, 0.3, 0.77):  # Python floats
    assert float(sched.time_at(sched.noise_to_signal(x))) == pytest.approx(x, abs=1e-12)
  rhos = np.array([0.0, 0.1, 1.0, 3.0, 20.0])
  np.testing.assert_allclose(sched.noise_to_signal(sched.time_at(rhos)), rhos, rtol=1e-9,
                             atol=1e-12)
  # jnp arrays, float32.
  tj = jnp.asarray(t, jnp.float32)
  np.testing.assert_allclose(sched.time_at(sched.noise_to_signal(tj)), t, atol=1e-5)
  rj = jnp.asarray(rhos[1:], jnp.float32)
  np.testing.assert_allclose(sched.noise_to_signal(sched.time_at(rj)), rhos[1:], rtol=1e-4)
  assert float(sched.time_at(np.inf)) == 0.0  # infinite noise is t = 0


def test_vp_time_at_clips_beyond_the_noisiest_ratio():
  rho_max = VP.noise_to_signal(0.0)
  assert rho_max == pytest.approx(math.sqrt((1 - 1e-3) / 1e-3), rel=1e-9)
  assert float(VP.time_at(2 * rho_max)) == 0.0
  assert np.isinf(FM.noise_to_signal(0.0))


# --- b. temporal resampling ---------------------------------------------------------------------


def test_down_time_averages_frame_pairs_and_up_time_duplicates():
  x = np.arange(4 * 1 * 2 * 1, dtype=np.float32).reshape(4, 1, 2, 1)  # frames [0,1],[2,3],...
  d = resample.down_time(x, 2)
  assert d.shape == (2, 1, 2, 1)
  np.testing.assert_allclose(d[:, 0, :, 0], [[1.0, 2.0], [5.0, 6.0]])
  np.testing.assert_allclose(resample.down_time(x, 4)[:, 0, :, 0], [[3.0, 4.0]])
  u = resample.up_time(d, 2)
  assert u.shape == x.shape
  np.testing.assert_allclose(u[:, 0, :, 0], [[1, 2], [1, 2], [5, 6], [5, 6]])
  # Leading batch axes are left alone; axis -4 is time.
  xb = np.stack([x, 10 * x])
  np.testing.assert_allclose(resample.down_time(xb, 2)[1], 10 * d)
  # JAX and NumPy agree.
  np.testing.assert_allclose(resample.down_time(jnp.asarray(x), 2), d)
  with pytest.raises(ValueError):
    resample.down_time(np.zeros((3, 2, 2, 1)), 2)


def test_video_resampling_composes_and_space_time_commute():
  y = np.random.default_rng(0).normal(size=(2, 8, 8, 8, 3))
  both = resample.down_video(y, 2, 4)
  assert both.shape == (2, 2, 4, 4, 3)
  np.testing.assert_allclose(both, resample.down(resample.down_time(y, 4), 2), atol=1e-12)
  np.testing.assert_allclose(both, resample.down_time(resample.down(y, 2), 4), atol=1e-12)
  np.testing.assert_allclose(resample.down_time(resample.down_time(y, 2), 2),
                             resample.down_time(y, 4), atol=1e-12)
  np.testing.assert_allclose(resample.down_video(resample.down_video(y, 2, 2), 2, 2),
                             resample.down_video(y, 4, 4), atol=1e-12)
  z = both
  np.testing.assert_allclose(resample.up_video(z, 2, 4), resample.up(resample.up_time(z, 4), 2))
  np.testing.assert_allclose(resample.up_video(z, 2, 4), resample.up_time(resample.up(z, 2), 4))
  # Down after Up is the identity; Up(Down) is the block-mean projection (idempotent).
  np.testing.assert_allclose(resample.down_video(resample.up_video(z, 2, 4), 2, 4), z,
                             atol=1e-12)
  p = resample.up_video(resample.down_video(y, 2, 2), 2, 2)
  np.testing.assert_allclose(resample.up_video(resample.down_video(p, 2, 2), 2, 2), p,
                             atol=1e-12)
  np.testing.assert_allclose(p[:, 0, 0, 0], y[:, :2, :2, :2].mean(axis=(1, 2, 3)), atol=1e-12)


# --- c. block noise -----------------------------------------------------------------------------


def expected_block_covariance(shape, spatial, temporal, gamma):
  """(1 - gamma) I + gamma 1 1^T inside each block, 0 across blocks, over all elements."""
  t, h, w = np.meshgrid(*(np.arange(n) for n in shape[:3]), indexing="ij")
  block = (t // temporal * 10_000 + h // spatial * 100 + w // spatial).reshape(-1)
  same = block[:, None] == block[None, :]
  return np.where(same, gamma, 0.0) + (1 - gamma) * np.eye(len(block))


@jax.jit
def _chunked_moments(flat):
  """Per-chunk sums and centred cross-products of [N, D] (N divisible by 10^4) in float32; 10^4
  terms per float32 sum keep the rounding error near 1e-5, far below the tolerances."""
  num = flat.shape[0]
  mean = flat.mean(0)
  chunks = (flat - mean).reshape(num // 10_000, 10_000, -1)
  return mean, jnp.einsum("cni,cnj->cij", chunks, chunks, precision="highest")


def empirical_covariance(samples):
  """[N, ...] -> (mean [D], covariance [D, D]), the chunks summed in float64. (jitted XLA: this
  NumPy's matmul is 20x slower.)"""
  flat = jnp.asarray(samples, jnp.float32).reshape(samples.shape[0], -1)
  mean, cross = _chunked_moments(flat)
  return np.asarray(mean, np.float64), np.asarray(cross, np.float64).sum(0) / flat.shape[0]


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.0], ids=["min", "half_min", "zero"])
@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
def test_block_noise_covariance(block, fraction):
  spatial, temporal = block
  m = renoise.block_size(spatial, temporal)
  assert renoise.min_block_gamma(spatial, temporal) == pytest.approx(-1 / (m - 1))
  gamma = fraction * renoise.min_block_gamma(spatial, temporal)
  # Two blocks along every axis: in-block pairs and neighbours in time and in space.
  shape = (2 * temporal, 2 * spatial, 2 * spatial, 1)
  num = 200_000
  noise = renoise.block_noise(fast_key(11), (num, *shape), gamma, spatial, temporal)
  mean, cov = empirical_covariance(noise)
  tol = n_sigma_tol(num)  # about 0.019
  np.testing.assert_allclose(mean, 0.0, atol=n_sigma_tol(num, var=1.0))
  np.testing.assert_allclose(cov, expected_block_covariance(shape, spatial, temporal, gamma),
                             atol=tol)
  if fraction == 1.0:  # at the smallest gamma the block sums vanish: Down(n') = 0 exactly
    np.testing.assert_allclose(resample.down_video(noise[:1000], spatial, temporal), 0.0,
                               atol=1e-5)


@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
def test_block_noise_rejects_gamma_out_of_range(block):
  spatial, temporal = block
  shape = (2 * temporal, 2 * spatial, 2 * spatial, 1)
  lower = renoise.min_block_gamma(spatial, temporal)
  with pytest.raises(ValueError, match="gamma"):
    renoise.block_noise(fast_key(0), shape, lower - 0.01, spatial, temporal)
  with pytest.raises(ValueError, match="gamma"):
    renoise.block_noise(fast_key(0), shape, 0.1, spatial, temporal)
  renoise.block_noise(fast_key(0), shape, lower, spatial, temporal)  # the bound is allowed


# --- d. renoising matches the next stage's start distribution ----------------------------------


def renoised_starts(pyramid, x, k, num, seed, corrective=True):
  """Draws x̂_{e_{k+1}} = gamma_e D_{k+1} + sigma_e n at stage k + 1 and jumps into stage k."""
  sched = pyramid.schedule
  end = pyramid.windows[k + 1][1]
  d_coarse = pyramid.level(x, k + 1)
  x_end = (float(sched.signal(end)) * d_coarse
           + float(sched.noise(end)) * normal(seed, (num, *d_coarse.shape)))
  if corrective:
    return pyramid.renoise(fast_key(seed), x_end, k)
  rescale, _ = renoise.renoise_coefficients(pyramid.windows[k][0], end, pyramid.gammas[k], sched)
  fs, ft = pyramid.jump(k)
  return rescale * resample.up_video(x_end, fs, ft)


@pytest.mark.parametrize("diffusion", DIFFUSIONS)
@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize("k", [0, 1])
def test_renoise_matches_next_stage_start(block, diffusion, k):
  """TPDiff Eqs. (16)-(18) / Pyramidal Flow Eqs. (18)-(21): mean gamma_s Up(Down(D_k)) and
  covariance sigma_s^2 I over all elements of stage k, for any block and schedule."""
  pyramid = make(3, block, diffusion)
  assert pyramid.jump(k) == block
  stage_shape = (8, 4, 4, 1) if block == (1, 4) else (4, 4, 4, 1)
  x = uniform_video(3, full_shape(pyramid, stage_shape, k))
  num = 100_000
  samples = renoised_starts(pyramid, x, k, num, 10 + k)
  assert samples.shape == (num, *stage_shape)
  sched = pyramid.schedule
  start = pyramid.windows[k][0]
  gamma_s, sigma_s = float(sched.signal(start)), float(sched.noise(start))
  d_k = pyramid.level(x, k)
  target_mean = gamma_s * np.asarray(pyramid.start_mean(d_k, k), np.float64).reshape(-1)
  mean, cov = empirical_covariance(samples)
  # Normalised by sigma_s, mean errors have unit standard error / sqrt(N), covariance entries
  # at most sqrt(2 / N): 6 standard errors each (module docstring).
  np.testing.assert_allclose((mean - target_mean) / sigma_s, 0.0,
                             atol=n_sigma_tol(num, var=1.0))
  np.testing.assert_allclose(cov / sigma_s**2, np.eye(cov.shape[0]), atol=n_sigma_tol(num))


@pytest.mark.parametrize("diffusion", DIFFUSIONS)
@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
def test_rescale_without_corrective_noise_fails_the_same_check(block, diffusion):
  pyramid = make(2, block, diffusion)
  stage_shape = (8, 4, 4, 1) if block == (1, 4) else (4, 4, 4, 1)
  x = uniform_video(3, full_shape(pyramid, stage_shape, 0))
  num = 20_000
  samples = renoised_starts(pyramid, x, 0, num, 4, corrective=False)
  sigma_s = float(pyramid.schedule.noise(pyramid.windows[0][0]))
  _, cov = empirical_covariance(samples)
  cov = cov / sigma_s**2
  assert not np.allclose(cov, np.eye(cov.shape[0]), atol=n_sigma_tol(num))
  # The elements of a block stay perfectly correlated with variance 1/m: the missing noise.
  m = renoise.block_size(*block)
  partner = 1 if block[0] == 2 else 4 * 4  # the next pixel, or the same pixel in the next frame
  np.testing.assert_allclose(cov[0, 0], 1 / m, rtol=0.05)
  np.testing.assert_allclose(cov[0, partner], 1 / m, rtol=0.05)


# --- e. the jump relation -----------------------------------------------------------------------


@pytest.mark.parametrize("partition", [None, "2-1-1", "1-1-2"])
@pytest.mark.parametrize("diffusion", DIFFUSIONS)
@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
def test_windows_satisfy_the_jump_relation(block, diffusion, partition):
  """rho(e_{k+1}) = sqrt(-g / (1 - g)) rho(s_k) for every jump, any schedule (TPDiff Eq. 20 in
  noise-to-signal form)."""
  pyramid = make(3, block, diffusion, partition=partition)
  sched = pyramid.schedule
  w = pyramid.windows
  assert w[0][1] == 1.0 and w[-1][0] == 0.0
  for k in range(pyramid.num_stages - 1):
    g = pyramid.gammas[k]
    assert g == pytest.approx(-1 / (renoise.block_size(*block) - 1))
    start, end_coarse = w[k][0], w[k + 1][1]
    assert 0.0 < start < end_coarse < w[k][1]  # the windows overlap
    assert rho(sched, end_coarse) == pytest.approx(math.sqrt(-g / (1 - g)) * rho(sched, start),
                                                   rel=1e-9)
    if diffusion == "flow_matching":  # TPDiff Eq. (20) / Pyramidal Flow Eq. (25) as printed
      a, b = math.sqrt(1 - g), math.sqrt(-g)
      assert end_coarse == pytest.approx(start * a / ((1 - start) * b + start * a), rel=1e-12)


@pytest.mark.parametrize("s", [0.1, 0.3, 0.6, 0.9])
def test_flow_matching_jump_closed_forms(s):
  # Pyramidal Flow Eq. (26), gamma = -1/3 (2x2 and 4-frame blocks): e = 2s / (1 + s).
  assert windows.jump_end(s, -1 / 3, FM) == pytest.approx(2 * s / (1 + s), rel=1e-12)
  assert windows.jump_start(2 * s / (1 + s), -1 / 3, FM) == pytest.approx(s, rel=1e-12)
  # TPDiff Eq. (21), gamma = -1 (frame pairs): e = sqrt2 s / (1 - s + sqrt2 s).
  e = windows.jump_end(s, -1.0, FM)
  assert e == pytest.approx(SQRT2 * s / (1 - s + SQRT2 * s), rel=1e-12)
  gamma_s, sigma_s = s, 1 - s
  # Eq. (21) gives gamma_{e_{k+1}} = sqrt2 gamma_s / (sigma_s + sqrt2 gamma_s); the rescale of
  # Eq. (17) is gamma_s / gamma_e, hence Eq. (22)'s coefficients.
  gamma_e = SQRT2 * gamma_s / (sigma_s + SQRT2 * gamma_s)
  assert float(FM.signal(e)) == pytest.approx(gamma_e, rel=1e-12)
  rescale, alpha = renoise.renoise_coefficients(s, e, -1.0, FM)
  assert rescale == pytest.approx(gamma_s / gamma_e, rel=1e-12)
  assert rescale == pytest.approx((sigma_s + SQRT2 * gamma_s) / SQRT2, rel=1e-12)
  assert alpha == pytest.approx(sigma_s / SQRT2, rel=1e-12)
  # Pyramidal Flow Eq. (27), gamma = -1/3: ((1 + s) / 2, sqrt3 (1 - s) / 2).
  rescale, alpha = renoise.renoise_coefficients(s, 2 * s / (1 + s), -1 / 3, FM)
  assert (rescale, alpha) == pytest.approx(((1 + s) / 2, math.sqrt(3) * (1 - s) / 2), rel=1e-12)
  # The same pyramids through make_pyramid.
  for block, closed in [((1, 2), lambda x: SQRT2 * x / (1 - x + SQRT2 * x)),
                        ((2, 1), lambda x: 2 * x / (1 + x)), ((1, 4), lambda x: 2 * x / (1 + x))]:
    w = make(3, block).windows
    for k in range(2):
      assert w[k + 1][1] == pytest.approx(closed(w[k][0]), rel=1e-12)


@pytest.mark.parametrize("gamma", [-1.0, -1 / 3, -1 / 7, -0.05])
def test_vp_renoise_coefficients(gamma):
  for s in (0.2, 0.5, 0.8):
    e = windows.jump_end(s, gamma, VP)
    ab_s, ab_e = float(VP.alpha_bar(s)), float(VP.alpha_bar(e))
    assert math.sqrt((1 - ab_e) / ab_e) == pytest.approx(
        math.sqrt(-gamma / (1 - gamma) * (1 - ab_s) / ab_s), rel=1e-9)
    rescale, alpha = renoise.renoise_coefficients(s, e, gamma, VP)
    assert rescale == pytest.approx(math.sqrt(ab_s / ab_e), rel=1e-12)
    assert alpha == pytest.approx(math.sqrt((1 - ab_s) / (1 - gamma)), rel=1e-12)
    # Covariance match, diagonal and off-diagonal (TPDiff Eqs. 18-19).
    sigma_e2 = 1 - ab_e
    assert rescale**2 * sigma_e2 + alpha**2 == pytest.approx(1 - ab_s, rel=1e-9)
    assert rescale**2 * sigma_e2 + alpha**2 * gamma == pytest.approx(0.0, abs=1e-12)


# --- f. the DDIM stage path (TPDiff Eqs. 10-11) ------------------------------------------------


def path_fixture():
  d, u, n = normal(21, (3, 4, 4, 4, 3))
  return d, u, n


@pytest.mark.parametrize("window", [(0.2, 0.7), (0.0, 0.4), (0.55, 1.0)])
@pytest.mark.parametrize("sched", [FM, VP], ids=DIFFUSIONS)
def test_stage_path_and_target(sched, window):
  s, e = window
  d, u, n = path_fixture()
  x_s, x_e = paths.stage_endpoints(d, u, n, s, e, sched)
  np.testing.assert_allclose(x_s, sched.signal(s) * u + sched.noise(s) * n, rtol=1e-6)
  np.testing.assert_allclose(paths.stage_point(x_s, x_e, 0.0, s, e, sched), x_s, atol=1e-4)
  np.testing.assert_allclose(paths.stage_point(x_s, x_e, 1.0, s, e, sched), x_e, atol=1e-4)
  target = paths.stage_target(x_s, x_e, s, e, sched)
  gamma_s = float(sched.signal(s))
  for t_local in (0.25, 0.5, 0.8):
    t = s + t_local * (e - s)
    assert paths.global_time(t_local, s, e) == pytest.approx(t)
    x_t = paths.stage_point(x_s, x_e, t_local, s, e, sched)
    if sched is VP:
      gamma_t, sigma_t = float(sched.signal(t)), float(sched.noise(t))
      rho_s, rho_e, rho_t = rho(sched, s), rho(sched, e), rho(sched, t)
      # eps_k is constant: x_t / gamma_t is affine in rho_t with slope eps_k (Eq. 10) ...
      slope = (x_t / gamma_t - x_s / gamma_s) / (rho_t - rho_s)
      np.testing.assert_allclose(slope, target, rtol=1e-4, atol=1e-4)
      # ... eps_k = n + (D - U) / (rho_e - rho_s) (Eq. 11 with Eqs. 7-8) ...
      np.testing.assert_allclose(target, n + (d - u) / (rho_e - rho_s), rtol=1e-4, atol=1e-4)
      # ... so x_t = gamma_t (U + w (D - U)) + sigma_t n: the marginal noise level of t.
      w = (rho_t - rho_s) / (rho_e - rho_s)
      np.testing.assert_allclose(x_t, gamma_t * (u + w * (d - u)) + sigma_t * n, rtol=1e-4,
                                 atol=1e-4)
    else:
      np.testing.assert_allclose(target, x_e - x_s, atol=1e-6)
      np.testing.assert_allclose(x_t, (1 - t_local) * x_s + t_local * x_e, atol=1e-6)
    # The x-prediction parametrisation recovers the target from the true D and U ...
    np.testing.assert_allclose(paths.target_from_clean(x_t, d, u, t_local, s, e, sched), target,
                               rtol=1e-4, atol=2e-4)
    # ... and misses it for a wrong D.
    wrong = paths.target_from_clean(x_t, d + 0.1, u, t_local, s, e, sched)
    assert float(jnp.abs(wrong - target).max()) > 1e-2


# --- g. exact samplers --------------------------------------------------------------------------


def exact_model_fn(pyramid, x1, scale=1.0):
  """The exact stage target of the single data point x1 (optionally scaled: a wrong field)."""

  def model_fn(x, t, k):
    s, e = pyramid.windows[k]
    clean = pyramid.level(x1, k)
    return scale * paths.exact_single_point_target(x, t, s, e, clean,
                                                   pyramid.start_mean(clean, k),
                                                   pyramid.schedule)

  return model_fn


def sampler_shape(block):
  spatial, temporal = block
  return (2 * temporal**2, 2 * spatial**2, 2 * spatial**2, 2)  # coarsest stage [2, 2, 2, 2]


@pytest.mark.parametrize("diffusion", DIFFUSIONS)
@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
def test_sample_pyramid_with_exact_target_returns_the_data_point(block, diffusion):
  pyramid = make(3, block, diffusion)
  shape = sampler_shape(block)
  x1 = uniform_video(100, shape)
  model_fn = exact_model_fn(pyramid, x1)
  keys = jax.random.split(fast_key(7), 3)  # three seeds at once
  out = jax.jit(jax.vmap(
      lambda key: samplers.sample_pyramid(model_fn, key, shape, pyramid, [2, 3, 4])))(keys)
  assert out.shape == (3, *shape)
  np.testing.assert_allclose(out, np.broadcast_to(x1, out.shape), atol=1e-4)


STEPS = (1, 3, 7)


@pytest.mark.parametrize("diffusion", DIFFUSIONS)
@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
def test_each_stage_lands_on_its_coupled_endpoint(block, diffusion):
  """From x̂_s = gamma_s U + sigma_s n the exact field must reach gamma_e D + sigma_e n with the
  same n, at every stage (not only the last, whose sigma_e = 0 hides noise errors), for any
  number of steps; a field scaled by 0.5 must miss."""
  pyramid = make(3, block, diffusion)
  sched = pyramid.schedule
  shape = sampler_shape(block)
  x1 = uniform_video(100, shape)

  def errors(scale):
    model_fn = exact_model_fn(pyramid, x1, scale)
    out = []
    for k in range(pyramid.num_stages):
      s, e = pyramid.windows[k]
      clean = pyramid.level(x1, k)
      start_mean = pyramid.start_mean(clean, k)
      n = normal(30 + k, clean.shape)
      x_s, x_e = paths.stage_endpoints(clean, start_mean, n, s, e, sched)
      for steps in STEPS:
        x = samplers.integrate_stage(model_fn, x_s, k, s, e, steps, sched)
        out.append(jnp.abs(x - x_e).max())
    return jnp.stack(out)

  errors = jax.jit(errors)  # one compilation for both scales
  err = np.asarray(errors(1.0))
  np.testing.assert_allclose(err, 0.0, atol=1e-4)
  err_wrong = np.asarray(errors(0.5))
  assert np.all(err_wrong > 0.05), err_wrong


def test_sample_pyramid_rejects_bad_arguments():
  pyramid = make(3, (2, 2))
  fn = exact_model_fn(pyramid, jnp.zeros((8, 8, 8, 1)))
  with pytest.raises(ValueError, match="steps_per_stage"):
    samplers.sample_pyramid(fn, jax.random.key(0), (8, 8, 8, 1), pyramid, [2, 2])
  with pytest.raises(ValueError, match="divisible"):
    samplers.sample_pyramid(fn, jax.random.key(0), (6, 8, 8, 1), pyramid, [2, 2, 2])
  with pytest.raises(ValueError):
    samplers.integrate_stage(fn, jnp.zeros((8, 8, 8, 1)), 0, 0.5, 1.0, 0, FM)


# --- h. stage-consistent RoPE positions (TPDiff Eq. 14) ----------------------------------------


@pytest.mark.parametrize("schedule", ["2", "4", "4-2", "2-4"])
def test_temporal_positions_are_stage_consistent(schedule):
  pyramid = stages.make_pyramid(3, spatial=False, frame_rate_schedule=schedule)
  num_frames = 2 * pyramid.temporal_factors[-1]
  frames = [num_frames // f for f in pyramid.temporal_factors]
  positions = [pyramid.temporal_positions(n, k) for k, n in enumerate(frames)]
  np.testing.assert_array_equal(positions[0], np.arange(num_frames))
  for k, pos in enumerate(positions):
    assert pos.dtype == np.float32 and pos.shape == (frames[k],)
    # A stage-k frame averages full-rate frames: its position is their mean position.
    as_video = np.arange(num_frames, dtype=np.float64).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(pos, resample.down_time(as_video, pyramid.temporal_factors[k])
                               .reshape(-1), atol=1e-6)
    np.testing.assert_array_equal(pyramid.temporal_positions(frames[k], k, consistent=False),
                                  np.arange(frames[k]))
  for k in range(pyramid.num_stages - 1):
    _, r = pyramid.jump(k)
    # The coarse frame's position is the mean of the finer frames that Up duplicates it into.
    fine = positions[k].reshape(-1, r)
    np.testing.assert_allclose(positions[k + 1], fine.mean(axis=1), atol=1e-6)
    dup = resample.up_time(positions[k + 1].reshape(-1, 1, 1, 1), r).reshape(-1, r)
    np.testing.assert_allclose(dup.mean(axis=1), fine.mean(axis=1), atol=1e-6)
  # A spatial-only pyramid keeps the frame indices at every stage.
  spatial = stages.make_pyramid(3)
  np.testing.assert_array_equal(spatial.temporal_positions(5, 2), np.arange(5))


# --- i. make_pyramid ----------------------------------------------------------------------------


@pytest.mark.parametrize("schedule, factors", [
    ("2", (1, 2, 4)), ("4", (1, 4, 16)), ("4-2", (1, 2, 8)), ("2-4", (1, 4, 8)),
    ((4, 2), (1, 2, 8)), (2, (1, 2, 4))])
def test_make_pyramid_frame_rate_schedules(schedule, factors):
  pyramid = stages.make_pyramid(3, spatial=False, frame_rate_schedule=schedule)
  assert pyramid.temporal_factors == factors
  assert pyramid.spatial_factors == (1, 1, 1)
  for k in range(2):
    r = factors[k + 1] // factors[k]
    assert pyramid.jump(k) == (1, r)
    assert pyramid.gammas[k] == pytest.approx(-1 / (r - 1))
  st = stages.make_pyramid(3, frame_rate_schedule=schedule)  # spatiotemporal
  assert st.spatial_factors == (1, 2, 4) and st.temporal_factors == factors
  for k in range(2):
    r = factors[k + 1] // factors[k]
    assert st.gammas[k] == pytest.approx(-1 / (4 * r - 1))
  assert st.stage_shape((16 * 2, 8, 8, 3), 2) == (32 // factors[2], 2, 2, 3)
  x = np.random.default_rng(0).normal(size=(2 * factors[2], 8, 8, 1))
  np.testing.assert_allclose(st.level(x, 2), resample.down_video(x, 4, factors[2]), atol=1e-12)


def test_make_pyramid_partition_and_defaults():
  pyramid = stages.make_pyramid(3, partition="2-1-1")
  assert pyramid.windows[2][1] == pytest.approx(0.5)  # e_{K-1}
  assert pyramid.windows[1][1] == pytest.approx(0.75)  # e_{K-2}
  assert pyramid.windows[0][1] == 1.0 and pyramid.windows[2][0] == 0.0
  assert pyramid.gammas == pytest.approx((-1 / 3, -1 / 3))
  assert stages.make_pyramid(3, partition=(1, 1, 2)).windows[1][1] == pytest.approx(0.5)
  uniform = stages.make_pyramid(3)
  np.testing.assert_allclose(uniform.windows,
                             windows.stage_windows(3, None, windows.MIN_SPATIAL_GAMMA, FM),
                             atol=1e-12)
  one = stages.make_pyramid(1, spatial=False)
  assert one.windows == ((0.0, 1.0),) and one.gammas == ()
  assert stages.make_pyramid(3, gamma=-0.2).gammas == (-0.2, -0.2)
  assert stages.make_pyramid(2, diffusion="ddim").schedule == VP


@pytest.mark.parametrize("kwargs", [
    {"gamma": -0.5},  # below -1/3 for 2x2 blocks
    {"gamma": 0.1},
    {"frame_rate_schedule": "2", "gamma": -0.2},  # below -1/7 for 2x2x2 blocks
    {"spatial": False, "frame_rate_schedule": "2", "gamma": -1.5},
    {"spatial": False, "frame_rate_schedule": "3"},  # not a power of two
    {"spatial": False, "frame_rate_schedule": "2-2-2"},  # three factors for two jumps
    {"spatial": False, "frame_rate_schedule": "two"},
    {"spatial": False},  # no jump changes anything
    {"spatial": False, "frame_rate_schedule": "2-1"},  # the jump into stage 0 changes nothing
    {"partition": "1-1"},
    {"partition": "1-0-1"},
    {"diffusion": "edm"},
])
def test_make_pyramid_rejects(kwargs):
  with pytest.raises(ValueError):
    stages.make_pyramid(3, **kwargs)
