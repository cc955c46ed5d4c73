"""Tests of the stage windows and the jump relation (``pfm/pyramid/windows.py``).

The uniform three-stage windows, rejected boundaries, and the jump relation rho(e_{k+1}) =
sqrt(-g / (1 - g)) rho(s_k) of every jump for every block, both schedules and the partitions
1-1-1, 2-1-1 and 1-1-2 (TPDiff Eq. (20) in noise-to-signal form; with overlapping windows). For
flow matching the closed forms: Pyramidal Flow Eq. (25) exactly as printed in Appendix A (and
``jump_start`` inverting ``jump_end``), Eq. (26) e = 2s / (1 + s) at gamma = -1/3 with the
coefficients of Eq. (27), and TPDiff Eq. (21) e = sqrt2 s / (1 - s + sqrt2 s) at gamma = -1 with
the rescale of Eq. (17) and the coefficients of Eq. (22); the same windows through
``make_pyramid``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pfm.pyramid import renoise, windows
from tests.pyramid_fixtures import (BLOCK_IDS, BLOCKS, DIFFUSIONS, FM, MIN_CORRELATION, SQRT2,
                                    eq25_end, make, rho)


def test_uniform_three_stage_windows():
  w = windows.stage_windows(3, None, MIN_CORRELATION, FM)
  np.testing.assert_allclose(w, [[0.5, 1.0], [0.2, 2 / 3], [0.0, 1 / 3]], atol=1e-12)


@pytest.mark.parametrize("correlation", [-1 / 3, -0.25, -0.1])
def test_jump_relation_matches_eq25(correlation):
  for s in [0.1, 0.2, 0.5, 0.8]:
    assert windows.jump_end(s, correlation, FM) == pytest.approx(eq25_end(s, correlation))
    end = windows.jump_end(s, correlation, FM)
    assert windows.jump_start(end, correlation, FM) == pytest.approx(s)
  # Eq. (26) at gamma = -1/3.
  assert windows.jump_end(0.3, MIN_CORRELATION, FM) == pytest.approx(2 * 0.3 / 1.3)


@pytest.mark.parametrize("bad", [[0.5], [0.6, 0.4], [0.0, 0.5], [0.5, 1.0]])
def test_bad_boundaries_raise(bad):
  with pytest.raises(ValueError, match="boundar"):
    windows.stage_windows(3, bad, MIN_CORRELATION, FM)


@pytest.mark.parametrize("partition", [None, "2-1-1", "1-1-2"])
@pytest.mark.parametrize("diffusion", DIFFUSIONS)
@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
def test_windows_satisfy_the_jump_relation(block, diffusion, partition):
  """rho(e_{k+1}) = sqrt(-g / (1 - g)) rho(s_k) for every jump, any schedule (TPDiff Eq. 20 in
  noise-to-signal form)."""
  pyramid = make(3, block, diffusion, partition=partition)
  sched = pyramid.noise_schedule
  w = pyramid.windows
  assert w[0][1] == 1.0 and w[-1][0] == 0.0
  for k in range(pyramid.num_stages - 1):
    g = pyramid.correlations[k]
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
