"""The toy of Pyramidal Flow Fig. 13 (``pfm/pyramid/coupling.py``): the exact fields transport
noise to the stage marginals, and coupled endpoint noise gives straighter stages."""

from __future__ import annotations

import numpy as np
import pytest

from pfm.pyramid import coupling


@pytest.mark.parametrize("coupled", [True, False])
def test_flow_reaches_each_stage_end_distribution(coupled):
  """Whatever the coupling, the ODE's particles at the end of the coarse stage have the mixture
  of N(e D_i, (1 - e)^2 I) over the points (mean and covariance), and the flow ends on the data."""
  data = coupling.toy_data()
  flow = coupling.integrate(data, 2, coupled, num_particles=6000, steps=80, seed=3)
  s, e = coupling.contiguous_windows(2)[1]
  coarse_end = flow.paths[0, -1]
  means = e * data.centres
  expected_mean = means.mean(0)
  expected_cov = (np.cov(means.T, bias=True) + (1 - e) ** 2 * np.eye(2))
  np.testing.assert_allclose(coarse_end.mean(0), expected_mean, atol=0.05)
  np.testing.assert_allclose(np.cov(coarse_end.T), expected_cov, atol=0.08)
  final = flow.paths[-1, -1]
  nearest = np.min(np.linalg.norm(final[:, None] - data.points[None], axis=-1), axis=1)
  assert np.quantile(nearest, 0.99) < 0.02
  # Every data point receives about its share of the particles.
  share = np.bincount(np.argmin(np.linalg.norm(final[:, None] - data.points[None], axis=-1), 1),
                      minlength=len(data.points)) / len(final)
  np.testing.assert_allclose(share, 1 / len(data.points), atol=0.03)


def test_coupled_noise_straightens_every_noisy_stage():
  data = coupling.toy_data()
  coupled = coupling.integrate(data, 3, True)
  independent = coupling.integrate(data, 3, False)
  # Stages whose end is still noisy (e < 1): far straighter, and one Euler step far closer.
  assert np.all(coupled.straightness[:2] < 0.3 * independent.straightness[:2])
  assert np.all(coupled.one_step_error[:2] < 0.5 * independent.one_step_error[:2])
  # The finest stage ends on clean data (sigma_e = 0): the same field for both couplings, from
  # the same start distribution (its particles differ, so only in expectation).
  np.testing.assert_allclose(coupled.straightness[2], independent.straightness[2], rtol=0.05)


def test_one_stage_flow_matching_has_no_coupling_choice():
  data = coupling.toy_data()
  a, b = coupling.integrate(data, 1, True), coupling.integrate(data, 1, False)
  np.testing.assert_allclose(a.paths, b.paths, atol=1e-9)
