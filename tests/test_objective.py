"""The on-device corruption of a packed batch follows Eqs. (6), (9)-(11) and (16)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from pfm import objective
from pfm.batch import PackedBatch
from pfm.pyramid import diffusions
from pfm.pyramid import windows as windows_lib

WINDOWS = tuple(map(tuple, windows_lib.stage_windows(3, None, windows_lib.MIN_SPATIAL_CORRELATION,
                                               diffusions.FlowMatching())))


def packed_batch(rng):
  """Two rows; row 0 holds segment 1 (stage 2, 3 history + 2 target tokens) and segment 2
  (stage 0, 4 target tokens); row 1 holds one segment (stage 1) and padding."""
  length, dim = 12, 6
  seg = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0], [1] * 6 + [0] * 6])
  stage = np.array([[2] * 5 + [0] * 4 + [0] * 3, [1] * 6 + [0] * 6])
  is_target = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1] + [0] * 6])
  text_seg = np.array([[1, 1, 1, 2, 2, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]])
  text = np.where(text_seg > 0, 50, 0)
  text[0, 0] = text[0, 3] = text[1, 0] = objective.BOS_TOKEN
  return dict(
      clean_end=rng.uniform(-1, 1, (2, length, dim)).astype(np.float32),
      clean_start=rng.uniform(-1, 1, (2, length, dim)).astype(np.float32),
      segment_ids=seg, causal_block=np.zeros_like(seg), stage=stage, is_target=is_target,
      positions=np.zeros((2, length, 2), np.float32), text_tokens=text,
      text_segment_ids=text_seg)


def test_current_unit_follows_the_coupled_path():
  batch = packed_batch(np.random.default_rng(0))
  cfg = objective.ObjectiveConfig(windows=WINDOWS, caption_dropout=0.0)
  packed = PackedBatch.from_fields(batch)
  inputs, target, weight, _ = objective.corrupt_packed_batch(jax.random.key(0), packed, cfg)
  video, text = inputs
  x_t, t = np.asarray(video.tokens), np.asarray(video.t)
  w = np.asarray(WINDOWS)
  for b, l in zip(*np.nonzero(batch["is_target"])):
    s, e = w[batch["stage"][b, l]]
    assert s <= t[b, l] <= e
    t_local = (t[b, l] - s) / (e - s)
    # Recover n from x̂_t (noise coefficient 1 - t), then check the target of Eq. (11).
    mean = t_local * e * batch["clean_end"][b, l] + (1 - t_local) * s * batch["clean_start"][b, l]
    n = (x_t[b, l] - mean) / (1 - t[b, l])
    expected = e * batch["clean_end"][b, l] - s * batch["clean_start"][b, l] - (e - s) * n
    np.testing.assert_allclose(target[b, l], expected, atol=1e-4)
  # One t per packed sample.
  assert len(set(np.round(t[0, 3:5], 6))) == 1 and len(set(np.round(t[0, 5:9], 6))) == 1
  # Text is modulated by its segment's time.
  np.testing.assert_allclose(text.t[0, :3], t[0, 3])
  np.testing.assert_allclose(text.t[0, 3:5], t[0, 5])
  # History: t in [2/3, 1]; padding is zero.
  hist = (batch["is_target"] == 0) & (batch["segment_ids"] > 0)
  assert np.all(t[hist] >= 2 / 3 - 1e-6) and np.all(t[hist] <= 1)
  assert np.all(x_t[batch["segment_ids"] == 0] == 0)
  # Every packed sample weighs the same and the weights sum to 1.
  assert float(np.sum(weight)) == pytest.approx(1.0)
  np.testing.assert_allclose(np.sum(weight[0, 3:5]), 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(np.sum(weight[1]), 1 / 3, rtol=1e-6)
  assert np.all(np.asarray(weight)[~batch["is_target"].astype(bool)] == 0)


def test_noise_statistics_over_many_draws():
  """Across keys, x̂_t of a target token has mean t' e D + (1 - t') s U and std 1 - t."""
  batch = packed_batch(np.random.default_rng(1))
  cfg = objective.ObjectiveConfig(windows=WINDOWS, caption_dropout=0.0)
  packed = PackedBatch.from_fields(batch)
  draw = jax.jit(jax.vmap(lambda k: objective.corrupt_packed_batch(k, packed, cfg)[0]))
  inputs = draw(jax.random.split(jax.random.key(1), 20_000))
  video = inputs[0]
  x, t = np.asarray(video.tokens[:, 0, 5]), np.asarray(video.t[:, 0, 5])
  s, e = WINDOWS[0]
  t_local = (t - s) / (e - s)
  mean = (t_local * e)[:, None] * batch["clean_end"][0, 5] + (
      (1 - t_local) * s)[:, None] * batch["clean_start"][0, 5]
  z = (x - mean) / (1 - t)[:, None]
  assert abs(z.mean()) < 0.02 and z.std() == pytest.approx(1.0, abs=0.02)
  assert t_local.mean() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("coupled", [True, False])
def test_endpoint_noise_coupling_over_many_draws(coupled):
  """Coupled endpoints share n (Eqs. 9-10): x̂_t has noise std (1 - t) and the velocity target
  noise std (e - s); independent endpoints (Fig. 13 left) give std sqrt((t' σ_e)^2 + ((1 - t')
  σ_s)^2) and sqrt(σ_e^2 + σ_s^2), with σ = 1 - time (flow matching)."""
  batch = packed_batch(np.random.default_rng(3))
  cfg = objective.ObjectiveConfig(windows=WINDOWS, caption_dropout=0.0, prediction="velocity",
                                  coupled_noise=coupled)
  packed = PackedBatch.from_fields(batch)
  draw = jax.jit(jax.vmap(lambda k: objective.corrupt_packed_batch(k, packed, cfg)[:2]))
  inputs, target = draw(jax.random.split(jax.random.key(2), 20_000))
  b, l = 0, 3  # a stage-2 token: s = 0, e = 1/3, so both endpoints are noisy
  s, e = WINDOWS[2]
  x, t = np.asarray(inputs[0].tokens[:, b, l]), np.asarray(inputs[0].t[:, b, l])
  t_local = (t - s) / (e - s)
  d, u = batch["clean_end"][b, l], batch["clean_start"][b, l]
  mean = (t_local * e)[:, None] * d + ((1 - t_local) * s)[:, None] * u
  sigma_s, sigma_e = 1 - s, 1 - e
  if coupled:
    x_std, v_std = 1 - t, e - s
  else:
    x_std, v_std = np.hypot(t_local * sigma_e, (1 - t_local) * sigma_s), np.hypot(sigma_e, sigma_s)
  z = (x - mean) / x_std[:, None]
  assert abs(z.mean()) < 0.02 and z.std() == pytest.approx(1.0, abs=0.02)
  r = np.asarray(target[:, b, l]) - (e * d - s * u)
  assert abs(r.mean()) < 0.02 * v_std and r.std() == pytest.approx(v_std, rel=0.02)


def test_caption_dropout_keeps_bos_and_drops_at_the_configured_rate():
  batch = packed_batch(np.random.default_rng(2))
  cfg = objective.ObjectiveConfig(windows=WINDOWS, caption_dropout=0.3)
  packed = PackedBatch.from_fields(batch)
  draw = jax.jit(jax.vmap(lambda k: objective.corrupt_packed_batch(k, packed, cfg)[0]))
  seg = np.asarray(draw(jax.random.split(jax.random.key(2), 4000))[1].segment_ids)
  assert np.all(seg[:, 0, 0] == 1) and np.all(seg[:, 0, 3] == 2)  # BOS always kept
  dropped = seg[:, 0, 1] == 0
  assert dropped.mean() == pytest.approx(0.3, abs=0.03)
  assert np.all((seg[:, 0, 2] == 0) == dropped)  # the whole caption goes together
