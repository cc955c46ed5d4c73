"""Tests of pfm.models.overlap: the overlapping output head on packed tokens."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pfm import models
from pfm.models import overlap
from pfm.pyramid import tokens as tokens_lib

P, C = 4, 3


def _packed_frames(frames, rng, pad=5):
  """Packs frames [(segment, frame id, h, w)] into one shuffled row with padding.

  Returns (segment_ids [1, L], frame [1, L], positions [1, L, 2], order): ``order[i]`` is the
  (frame number, token index in row-major order) of packed token i, or None for padding.
  """
  entries = []
  for number, (segment, frame, h, w) in enumerate(frames):
    for r in range(h):
      for c in range(w):
        entries.append((segment, frame, (r, c), (number, r * w + c)))
  entries = [entries[i] for i in rng.permutation(len(entries))]
  entries += [(0, 0, (0, 0), None)] * pad
  segment_ids = jnp.asarray([[e[0] for e in entries]], jnp.int32)
  frame = jnp.asarray([[e[1] for e in entries]], jnp.float32)
  positions = jnp.asarray([[e[2] for e in entries]], jnp.float32)
  return segment_ids, frame, positions, [e[3] for e in entries]


def _reference_frame(windows, h, w, p):
  """Dense overlap-add of one frame's windows [h, w, 2p, 2p, C] on a pixel canvas."""
  tent = overlap.tent_window(p)
  tent2d = tent[:, None, None] * tent[None, :, None]
  canvas = np.zeros((h * p + p, w * p + p, windows.shape[-1]))
  weight = np.zeros((h * p + p, w * p + p, 1))
  for r in range(h):
    for c in range(w):
      canvas[r * p:r * p + 2 * p, c * p:c * p + 2 * p] += tent2d * windows[r, c]
      weight[r * p:r * p + 2 * p, c * p:c * p + 2 * p] += tent2d
  return (canvas / weight)[p // 2:p // 2 + h * p, p // 2:p // 2 + w * p]


# Two samples, one of two frames; frame grids of 3x4, 3x4, 2x2 and a single token.
FRAMES = [(1, 0.0, 3, 4), (1, 1.0, 3, 4), (2, 0.0, 2, 2), (3, 5.0, 1, 1)]


def test_tent_windows_sum_to_one_at_stride_p():
  for p in (2, 4, 8):
    tent = overlap.tent_window(p)
    assert tent.shape == (2 * p,) and (tent > 0).all() and (tent < 1).all()
    np.testing.assert_allclose(tent[:p] + tent[p:], 1.0, atol=1e-6)


def test_neighbour_indices_on_a_shuffled_packed_row():
  rng = np.random.default_rng(0)
  segment_ids, frame, positions, order = _packed_frames(FRAMES, rng)
  neighbours = np.asarray(overlap.neighbour_indices(segment_ids, frame, positions))[0]
  where = {o: i for i, o in enumerate(order) if o is not None}
  for i, o in enumerate(order):
    if o is None:
      assert (neighbours[i] == -1).all()
      continue
    number, index = o
    _, _, h, w = FRAMES[number]
    r, c = divmod(index, w)
    for dr in (-1, 0, 1):
      for dc in (-1, 0, 1):
        inside = 0 <= r + dr < h and 0 <= c + dc < w
        expected = where[(number, (r + dr) * w + c + dc)] if inside else -1
        assert neighbours[i, 1 + dr, 1 + dc] == expected


def test_overlap_add_equals_a_dense_transposed_convolution():
  """Random windows, shuffled and packed: each frame equals the canvas overlap-add."""
  rng = np.random.default_rng(1)
  segment_ids, frame, positions, order = _packed_frames(FRAMES, rng)
  windows = rng.normal(size=(1, len(order), 4 * P * P * C)).astype(np.float32)   # canvas order
  out = np.asarray(overlap.overlap_add(
    jnp.asarray(overlap.to_routing_order(windows, P)),
    overlap.neighbour_indices(segment_ids, frame, positions), P))[0]
  for number, (_, _, h, w) in enumerate(FRAMES):
    packed = [i for i, o in enumerate(order) if o is not None and o[0] == number]
    packed.sort(key=lambda i: order[i][1])                            # row-major
    grid = windows[0, packed].reshape(h, w, 2 * P, 2 * P, C)
    expected = tokens_lib.patchify(_reference_frame(grid, h, w, P), P)
    np.testing.assert_allclose(out[packed], expected, atol=1e-5)


def test_windows_that_agree_reproduce_the_frame_exactly():
  """Windows cropped from one image give that image back, at frame borders too."""
  rng = np.random.default_rng(2)
  h, w = 3, 4
  segment_ids, frame, positions, order = _packed_frames([(1, 0.0, h, w)], rng, pad=0)
  image = rng.uniform(-1, 1, size=(h * P, w * P, C))
  padded = np.pad(image, ((P // 2, P // 2), (P // 2, P // 2), (0, 0)),
                  constant_values=np.nan)                              # never read unweighted
  windows = np.stack([
    np.nan_to_num(padded[r * P:r * P + 2 * P, c * P:c * P + 2 * P]).ravel()
    for r, c in (divmod(o[1], w) for o in order)])[None]
  out = np.asarray(overlap.overlap_add(
    jnp.asarray(overlap.to_routing_order(windows, P), jnp.float32),
    overlap.neighbour_indices(segment_ids, frame, positions), P))[0]
  np.testing.assert_allclose(out, tokens_lib.patchify(image, P)[[o[1] for o in order]],
                             atol=1e-5)


def test_per_token_errors_make_seams_with_the_patch_head_and_none_blended():
  """A smooth frame plus one error per token: steps at patch borders unless blended."""
  rng = np.random.default_rng(3)
  h = w = 8
  segment_ids, frame, positions, order = _packed_frames([(1, 0.0, h, w)], rng, pad=0)
  y, x = np.meshgrid(np.arange(h * P + P), np.arange(w * P + P), indexing="ij")
  smooth = np.sin(0.2 * y + 0.1 * x)[..., None] * np.ones(C)          # the frame + margins
  windows = np.stack([
    smooth[r * P:r * P + 2 * P, c * P:c * P + 2 * P] + 0.3 * rng.normal()
    for r, c in (divmod(o[1], w) for o in order)]).reshape(1, h * w, -1)
  row_major = np.argsort([o[1] for o in order])
  own = windows.reshape(1, h * w, 4, P // 2, 4, P // 2, C)[:, :, 1:3, :, 1:3]
  blended = overlap.overlap_add(
    jnp.asarray(overlap.to_routing_order(windows, P), jnp.float32),
    overlap.neighbour_indices(segment_ids, frame, positions), P)

  def border_to_interior(tokens):
    image = tokens_lib.unpatchify(
      np.asarray(tokens).reshape(h * w, -1)[row_major], P, h * P, w * P)
    steps = np.abs(np.diff(image, axis=1)).mean(axis=(0, 2))         # per column pair
    border = (np.arange(w * P - 1) % P) == P - 1
    return steps[border].mean() / steps[~border].mean()

  assert border_to_interior(own) > 3.0
  assert border_to_interior(blended) < 1.5


def test_gradient_is_that_of_the_linear_blend():
  """The gather's custom gradient (gathered from the opposite neighbours) is the transpose of
  the blend: the blend is linear, so <c, blend(w)> = <vjp(c), w> for every w and c."""
  rng = np.random.default_rng(4)
  segment_ids, frame, positions, order = _packed_frames(FRAMES, rng)
  neighbours = overlap.neighbour_indices(segment_ids, frame, positions)
  windows = jnp.asarray(rng.normal(size=(1, len(order), 4 * P * P * C)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(1, len(order), P * P * C)), jnp.float32)
  blend = lambda w: overlap.overlap_add(w, neighbours, P)
  _, vjp = jax.vjp(blend, windows)
  probe = jnp.asarray(rng.normal(size=windows.shape), jnp.float32)
  np.testing.assert_allclose(jnp.vdot(cotangent, blend(probe)), jnp.vdot(vjp(cotangent)[0], probe),
                             rtol=1e-5)


def test_odd_patch_sizes_and_unknown_heads_are_refused():
  with pytest.raises(ValueError, match="even patch size"):
    overlap.overlap_add(jnp.zeros((1, 2, 4 * 9 * 3)), jnp.zeros((1, 2, 3, 3), jnp.int32), 3)
  config = models.model_config("smoke", patch_size=3, output_head="overlap")
  with pytest.raises(ValueError, match="even patch size"):
    models.build_model(config, nnx.Rngs(0))
  with pytest.raises(ValueError, match="output_head"):
    models.build_model(dataclasses.replace(config, output_head="conv"), nnx.Rngs(0))
