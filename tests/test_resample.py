"""Tests of Down and Up between pyramid levels (``pfm/pyramid/resample.py``), in space and time.

Spatial Down is 2^k x 2^k average pooling and Up nearest-neighbour upsampling (Pyramidal Flow
Sec. 3.2); temporal Down averages consecutive frames and Up duplicates them (TPDiff Sec. 3.2-3.3).
Checked: values on small inputs, Down composing across levels (Down(Down(x, 2), 2) = Down(x, 4),
in space, in time and in both), space and time commuting in ``down_video`` / ``up_video``, Down
after Up being the identity and Up(Down) the idempotent block-mean projection, leading batch
axes, the agreement of JAX and NumPy, and frame counts that a factor does not divide.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pfm.pyramid import resample


def test_down_up_levels():
  x = np.arange(4 * 4, dtype=np.float32).reshape(4, 4, 1)
  d = resample.down(x, 2)
  np.testing.assert_allclose(d[..., 0], [[2.5, 4.5], [10.5, 12.5]])
  u = resample.up(d, 2)
  assert u.shape == x.shape and u[0, 1, 0] == u[1, 0, 0] == 2.5
  # Down composes: Down(Down(x, 2), 2) == Down(x, 4).
  y = np.random.default_rng(0).normal(size=(8, 8, 3))
  np.testing.assert_allclose(resample.down(resample.down(y, 2), 2), resample.down(y, 4))


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
