"""Tests of ``make_pyramid`` and ``Pyramid`` (``pfm/pyramid/stages.py``).

Stage-consistent temporal RoPE positions (TPDiff Eq. 14): a stage-k frame sits at the mean
position of the full-rate frames it averages, consistent across jumps, while spatial-only
pyramids keep the frame indices. ``make_pyramid``: the frame-rate schedules 2, 4, 4-2 and 2-4 and
their temporal factors, jumps and default correlations -1/(m - 1) for temporal and spatiotemporal
pyramids, stage shapes and levels, the partitions 2-1-1 and 1-1-2 and the defaults (uniform
windows, a single stage, an explicit in-block correlation, DDIM), and the rejected arguments.
"""

from __future__ import annotations

import numpy as np
import pytest

from pfm.pyramid import resample, stages, windows
from tests.pyramid_fixtures import FM, VP


# --- stage-consistent RoPE positions (TPDiff Eq. 14) ----------------------------------------------


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


# --- make_pyramid ---------------------------------------------------------------------------------


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
    assert pyramid.correlations[k] == pytest.approx(-1 / (r - 1))
  st = stages.make_pyramid(3, frame_rate_schedule=schedule)  # spatiotemporal
  assert st.spatial_factors == (1, 2, 4) and st.temporal_factors == factors
  for k in range(2):
    r = factors[k + 1] // factors[k]
    assert st.correlations[k] == pytest.approx(-1 / (4 * r - 1))
  assert st.stage_shape((16 * 2, 8, 8, 3), 2) == (32 // factors[2], 2, 2, 3)
  x = np.random.default_rng(0).normal(size=(2 * factors[2], 8, 8, 1))
  np.testing.assert_allclose(st.level(x, 2), resample.down_video(x, 4, factors[2]), atol=1e-12)


def test_make_pyramid_partition_and_defaults():
  pyramid = stages.make_pyramid(3, partition="2-1-1")
  assert pyramid.windows[2][1] == pytest.approx(0.5)  # e_{K-1}
  assert pyramid.windows[1][1] == pytest.approx(0.75)  # e_{K-2}
  assert pyramid.windows[0][1] == 1.0 and pyramid.windows[2][0] == 0.0
  assert pyramid.correlations == pytest.approx((-1 / 3, -1 / 3))
  assert stages.make_pyramid(3, partition=(1, 1, 2)).windows[1][1] == pytest.approx(0.5)
  uniform = stages.make_pyramid(3)
  np.testing.assert_allclose(uniform.windows,
                             windows.stage_windows(3, None, windows.MIN_SPATIAL_CORRELATION, FM),
                             atol=1e-12)
  one = stages.make_pyramid(1, spatial=False)
  assert one.windows == ((0.0, 1.0),) and one.correlations == ()
  assert stages.make_pyramid(3, correlation=-0.2).correlations == (-0.2, -0.2)
  assert stages.make_pyramid(2, diffusion="ddim").noise_schedule == VP


@pytest.mark.parametrize("kwargs", [
    {"correlation": -0.5},  # below -1/3 for 2x2 blocks
    {"correlation": 0.1},
    {"frame_rate_schedule": "2", "correlation": -0.2},  # below -1/7 for 2x2x2 blocks
    {"spatial": False, "frame_rate_schedule": "2", "correlation": -1.5},
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
