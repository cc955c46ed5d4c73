"""Tests of the diffusion forms and their noise schedules (``pfm/pyramid/diffusions.py``),
x_t = gamma_t x + sigma_t n.

Flow matching (gamma_t = t, sigma_t = 1 - t) and the variance-preserving DDIM schedule
(gamma_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t)) in the project's convention (t = 0
noise, t = 1 data), the form of TPDiff (Ran & Shou) Eq. (6): their coefficients and end points
(VP keeps alpha_bar_0 = min_alpha_bar of signal at the noisy end), strict monotonicity of signal,
noise and noise-to-signal ratio, the agreement of the float64 NumPy path with the jitted float32
jnp path, ``diffusions.get`` (each form's noise schedule and native target), and that
``noise_to_signal`` and ``time_at`` are inverses on floats,
NumPy and jnp arrays (infinite noise is t = 0; VP clips ratios beyond its noisiest one). The tests
cite no equation beyond these definitions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfm.pyramid import diffusions
from tests.pyramid_fixtures import DIFFUSIONS, FM, VP


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
  assert diffusions.VariancePreserving(0.01).alpha_bar(0.0) == pytest.approx(0.01, rel=1e-9)
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
  assert diffusions.get("ddim").noise_schedule == VP
  assert diffusions.get("flow_matching").noise_schedule == FM
  assert [diffusions.get(name).native_prediction for name in diffusions.NAMES] == [
      "velocity", "epsilon"]
  with pytest.raises(ValueError):
    diffusions.get("edm")


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
