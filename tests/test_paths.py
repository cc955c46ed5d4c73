"""Tests of the path and target inside one pyramid stage (``pfm/pyramid/paths.py``).

The coupled endpoints x̂_s = gamma_s Up(Down(D)) + sigma_s n and x̂_e = gamma_e D + sigma_e n
(Pyramidal Flow Eqs. 9-10) and, for flow matching, the straight path between them with noise
coefficient 1 - t (Eq. 6 with Eqs. 9-10) and the velocity target as its derivative in t'; the
DDIM stage path of TPDiff Eqs. (10)-(11) (a constant stage noise eps_k, x_t at the marginal noise
level of t); both schedules' endpoints, local-to-global time and ``target_from_clean``, exact for
the true clean endpoint and wrong for a wrong one; and the local time distributions (uniform,
logit-normal, unknown names rejected).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfm.pyramid import paths, resample
from tests.pyramid_fixtures import DIFFUSIONS, FM, VP, path_fixture, rho


def test_coupled_path_endpoints_and_target():
  key = jax.random.key(4)
  d, u, n = jax.random.normal(key, (3, 4, 4, 3))
  s, e = 0.2, 2 / 3
  x_s, x_e = paths.stage_endpoints(d, u, n, s, e, FM)
  np.testing.assert_allclose(paths.interpolate(x_s, x_e, 0.0), x_s)
  np.testing.assert_allclose(paths.interpolate(x_s, x_e, 1.0), x_e)
  # The noise coefficient of x̂_t is 1 - t (Eq. 6 with Eqs. 9-10).
  t_local = 0.3
  t = paths.global_time(t_local, s, e)
  x_t_noise_only = paths.interpolate(
      *paths.stage_endpoints(0 * d, 0 * u, n, s, e, FM), t_local)
  np.testing.assert_allclose(x_t_noise_only, (1 - t) * n, rtol=1e-6, atol=1e-6)
  # The target is the derivative of the path in t'.
  h = 1e-3
  finite = (paths.interpolate(x_s, x_e, t_local + h) - paths.interpolate(x_s, x_e, t_local)) / h
  np.testing.assert_allclose(finite, paths.velocity_target(x_s, x_e), atol=1e-2)


def test_local_time_distributions():
  u = paths.sample_local_time(jax.random.key(0), (100_000,))
  assert 0.0 <= float(u.min()) and float(u.max()) < 1.0 and abs(float(u.mean()) - 0.5) < 0.01
  ln = paths.sample_local_time(jax.random.key(0), (100_000,), "logit_normal")
  assert abs(float(jnp.median(ln)) - 0.5) < 0.01 and float(ln.std()) < float(u.std())
  with pytest.raises(ValueError):
    paths.sample_local_time(jax.random.key(0), (1,), "beta")


def test_target_from_clean_is_exact_for_the_true_clean_endpoint():
  key = jax.random.key(5)
  x1 = jax.random.uniform(key, (8, 8, 3), minval=-1, maxval=1)
  d, u = x1, resample.up(resample.down(x1, 2), 2)
  n = jax.random.normal(jax.random.key(6), d.shape)
  s, e, t_local = 0.5, 1.0, 0.7
  x_s, x_e = paths.stage_endpoints(d, u, n, s, e, FM)
  x_t = paths.interpolate(x_s, x_e, t_local)
  np.testing.assert_allclose(
      paths.target_from_clean(x_t, d, u, t_local, s, e, FM), paths.velocity_target(x_s, x_e),
      atol=1e-5)
  # A wrong clean prediction gives a wrong velocity.
  assert not np.allclose(paths.target_from_clean(x_t, d + 0.1, u, t_local, s, e, FM),
                         paths.velocity_target(x_s, x_e), atol=1e-2)


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
