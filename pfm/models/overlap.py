"""Overlapping output patches: each video token paints a 2p x 2p window, blended with its
neighbours' windows by a tent, so the output has no seams on the p x p patch grid.

The DiT/SD3 output head maps each token to its own p x p patch. Two neighbouring patches come
from two tokens through the same linear map, and nothing ties the pixels on either side of their
border together: the errors of a small model jump at every border, and a sample shows the patch
grid (at patch 8 on 64x64 pixels, an 8x8 grid of visible seams). The overlapping head
(``MMDiTConfig.output_head = "overlap"``) lets every token predict a 2p x 2p window centred on
its patch, weights the window by the separable tent ``w(u) = 1 - |u - p| / p`` (u the pixel
centre, 0 < u < 2p) and adds the windows up. Stride-p tents sum to one, so every pixel is a
convex combination of the predictions of the (up to four) tokens nearest to it, and their weights
fall continuously to zero at each window's edge: the output is continuous across patch borders
whatever the network predicts. It is a transposed convolution with stride p and kernel 2p (a
kernel divisible by its stride, which does not checkerboard: Odena et al., Distill 2016) whose
kernel is a learned map times a fixed tent; at frame borders, where a window has no neighbour,
the weights are renormalised.

Tokens are packed (``pfm.batch.VideoTokens``), so neighbours are found by their metadata: the
token of the same sample (segment) and frame (RoPE position) one patch up, down, left or right
(``positions``). The cost is one final linear layer with 4x the outputs, a [B, L, L] match of
the token metadata per forward pass (the size of the attention mask), and one gather of the
window quarters along the token axis, whose gradient is gathered back from the opposite
neighbours rather than scattered.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Position tolerance of a neighbour match, in patch units (current-unit positions are integers).
_POSITION_TOLERANCE = 1e-3


def tent_window(p: int) -> np.ndarray:
  """The 1-D tent ``1 - |u - p| / p`` at the pixel centres u = 0.5 .. 2p - 0.5 of a window.

  Shifted copies at stride p sum to one at every pixel.

  Returns:
    float32 [2p], values in (0, 1).
  """
  u = np.arange(2 * p, dtype=np.float64) + 0.5
  return (1.0 - np.abs(u - p) / p).astype(np.float32)


def neighbour_indices(segment_ids: jax.Array, frame: jax.Array,
                      positions: jax.Array) -> jax.Array:
  """The token one patch away in each of the 8 directions, in the same sample and frame.

  Args:
    segment_ids: int [B, L], the packed sample of each token (0 = padding, never a neighbour).
    frame: [B, L] (int or float), equal for the tokens of one frame of a sample: the temporal
      RoPE position (``VideoTokens.rope_positions``).
    positions: float [B, L, 2] (row, col) of each token in patch units.

  Returns:
    int32 [B, L, 3, 3]: entry ``[b, i, 1 + dr, 1 + dc]`` is the index on the token axis of the
    token at (row + dr, col + dc) of token i's sample and frame, or -1 where there is none (a
    frame border, padding, or a history unit whose grid is coarser than one patch).
  """
  same = ((segment_ids[:, :, None] == segment_ids[:, None, :])
          & (segment_ids[:, None, :] != 0)
          & (frame[:, :, None] == frame[:, None, :]))                          # [B, Li, Lj]
  offset = positions[:, None, :, :] - positions[:, :, None, :]                # pos_j - pos_i
  rows = []
  for dr in (-1, 0, 1):
    cols = []
    for dc in (-1, 0, 1):
      match = (same & (jnp.abs(offset[..., 0] - dr) < _POSITION_TOLERANCE)
               & (jnp.abs(offset[..., 1] - dc) < _POSITION_TOLERANCE))
      cols.append(jnp.where(match.any(-1), jnp.argmax(match, -1), -1).astype(jnp.int32))
    rows.append(jnp.stack(cols, -1))
  return jnp.stack(rows, -2)


@jax.custom_vjp
def _gather_neighbour(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
  """``x[b, index[b, i, k], k]`` along the token axis, 0 where ``index`` is -1.

  ``index`` is one direction d of `neighbour_indices` and ``inverse`` the opposite one, -d: the
  neighbour relation is symmetric (j is i's neighbour at d exactly when i is j's at -d), so the
  gradient of this gather is the gather of the cotangent from the opposite neighbours. XLA would
  otherwise transpose the gather into a scatter-add, which its CPU backend runs slowly.

  Args:
    x: float [B, L, K, F].
    index, inverse: int32 [B, L, K] in -1 .. L - 1: per slot k, the directions d and -d.

  Returns:
    [B, L, K, F], the dtype of ``x``.
  """
  return _take(x, index)


def _take(x, index):
  taken = jnp.take_along_axis(x, jnp.maximum(index, 0)[..., None], axis=1)
  return jnp.where((index >= 0)[..., None], taken, jnp.zeros((), x.dtype))


_gather_neighbour.defvjp(lambda x, index, inverse: (_take(x, index), inverse),
                         lambda inverse, cotangent: (_take(cotangent, inverse), None, None))


# The features of a window come in routing order: 16 slots (h, w, a, b), each of h, w, a, b in
# {0, 1}, each slot one (p/2) x (p/2) quarter of the 2p x 2p window. The receiving token's
# half-cell (h, w) is covered by 4 windows: its own (a = b = 0) and those of its neighbours at
# (dr, dc) = (a (2 h - 1), b (2 w - 1)). Slot (h, w, a, b) of every window holds its quarter
# (1 + h - 2 dr, 1 + w - 2 dc): the one that lands on half-cell (h, w) of the token at -(dr, dc)
# from the window's own token. Every quarter of a
# window has exactly one slot, so the blend is one gather along the token axis and a sum over the
# 4 slots of each half-cell, with no slicing of the window (the gradient of 16 slices, a sum of
# padded arrays, was most of the head's cost on a CPU).
_SLOTS = [(h, w, a, b) for h in (0, 1) for w in (0, 1) for a in (0, 1) for b in (0, 1)]
_OFFSETS = np.array([(a * (2 * h - 1), b * (2 * w - 1)) for h, w, a, b in _SLOTS])   # (dr, dc)
_QUARTERS = np.array([(1 + h - 2 * dr, 1 + w - 2 * dc)
                      for (h, w, _, _), (dr, dc) in zip(_SLOTS, _OFFSETS)])        # (qr, qc)
_DIRECTION = (1 + _OFFSETS[:, 0]) * 3 + 1 + _OFFSETS[:, 1]   # into neighbours [.., 3 * 3]
_OPPOSITE = (1 - _OFFSETS[:, 0]) * 3 + 1 - _OFFSETS[:, 1]


def to_routing_order(windows, patch_size: int):
  """Windows flattened in (2p, 2p, C) canvas order -> the routing order `overlap_add` reads.

  Args:
    windows: ``[..., (2p)^2 * C]`` (NumPy or JAX), each a 2p x 2p window centred on its patch.
    patch_size: p, even.

  Returns:
    The same features, permuted: ``[..., 16 * (p/2)^2 * C]``, slot-major (see `_SLOTS`).
  """
  p, s = patch_size, patch_size // 2
  *lead, size = windows.shape
  quarters = windows.reshape(*lead, 4, s, 4, s, size // (4 * p * p))
  slots = [quarters[..., qr, :, qc, :, :] for qr, qc in _QUARTERS]
  return (np.stack if isinstance(windows, np.ndarray) else jnp.stack)(slots, -4).reshape(
      *lead, size)


def overlap_add(windows: jax.Array, neighbours: jax.Array, patch_size: int) -> jax.Array:
  """Blends each token's 2p x 2p window with its neighbours' into its p x p patch.

  Pixel (y, x) of token i's patch, at (y + p/2, x + p/2) of its own window, receives the tent
  weighted predictions of token i and of the neighbours whose windows cover it (the one above or
  below, to the left or right, and the diagonal one between them), divided by the sum of the
  weights present (one inside a frame, less at its borders).

  Args:
    windows: float [B, L, (2p)^2 * C], each token's window in routing order
      (`to_routing_order` of the (2p, 2p, C) canvas order; a learned layer can emit it directly).
    neighbours: int32 [B, L, 3, 3] from `neighbour_indices` (-1 = none).
    patch_size: p, even.

  Returns:
    float [B, L, p^2 * C] in ``pfm.pyramid.tokens.patchify`` order, the dtype of ``windows``.

  Raises:
    ValueError: for an odd patch size or a window size that is not (2p)^2 * C.
  """
  p = patch_size
  b, n, size = windows.shape
  if p % 2 or size % (4 * p * p):
    raise ValueError(f"overlap_add: needs an even patch size and windows of (2p)^2 * C "
                     f"features, got p={p} and {size}")
  s, c = p // 2, size // (4 * p * p)
  tent = tent_window(p).reshape(4, s)
  slot_weight = jnp.asarray(tent[_QUARTERS[:, 0], :, None] * tent[_QUARTERS[:, 1], None, :])
  flat = neighbours.reshape(b, n, 9)
  index, opposite = flat[:, :, _DIRECTION], flat[:, :, _OPPOSITE]              # [B, L, 16]
  slots = _gather_neighbour(windows.reshape(b, n, 16, s * s * c), index, opposite)
  weight = jnp.where((index >= 0)[..., None, None], slot_weight, 0.0)          # [B, L, 16, s, s]
  total = (slots.reshape(b, n, 16, s, s, c) * weight[..., None]).reshape(
      b, n, 2, 2, 4, s, s, c).sum(4)                                           # [B, L, h, w, y, x, C]
  weights = weight.reshape(b, n, 2, 2, 4, s, s).sum(4)[..., None]
  patch = total / jnp.where(weights > 0, weights, 1.0)  # no weight only at padding tokens
  return patch.transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, n, p * p * c).astype(windows.dtype)
