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
(``positions``). The cost is one final linear layer with 4x the outputs and a [B, L, L] match of
the token metadata per forward pass, the size of the attention mask.
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


def overlap_add(windows: jax.Array, neighbours: jax.Array, patch_size: int) -> jax.Array:
  """Blends each token's 2p x 2p window with its neighbours' into its p x p patch.

  Pixel (y, x) of token i's patch, at (y + p/2, x + p/2) of its own window, receives the tent
  weighted predictions of token i and of the neighbours whose windows cover it (the one above or
  below, to the left or right, and the diagonal one between them), divided by the sum of the
  weights present (one inside a frame, less at its borders).

  Args:
    windows: float [B, L, (2p)^2 * C], each token's window flattened in (2p, 2p, C) order.
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
  tent = jnp.asarray(tent_window(p)).reshape(4, s)                 # [quarter, pixel]
  # Quarter blocks of each window: [B, L, quarter row, s, quarter col, s, C].
  quarters = windows.reshape(b, n, 4, s, 4, s, c)

  def from_token(index, qr, qc):
    """Quarter (qr, qc) of the window of token ``index`` [B, L] (-1: none) and its weight."""
    block = quarters[:, :, qr, :, qc].reshape(b, n, s * s * c)
    block = jnp.take_along_axis(block, jnp.maximum(index, 0)[..., None], axis=1)
    present = (index >= 0)[..., None, None]
    weight = tent[qr][:, None] * tent[qc][None, :]                 # [s, s]
    weight = jnp.where(present, weight, 0.0)[..., None]            # [B, L, s, s, 1]
    return block.reshape(b, n, s, s, c) * weight, weight

  own = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  halves = []
  for h in (0, 1):        # top, bottom half of the patch: the neighbour above, below covers it
    row = []
    for w in (0, 1):      # left, right half: the neighbour to the left, right
      total = weights = 0.0
      for dr in (0, 2 * h - 1):
        for dc in (0, 2 * w - 1):
          index = own if dr == dc == 0 else neighbours[:, :, 1 + dr, 1 + dc]
          # Token at (dr, dc) covers this quarter with its window's quarter (1 + h - 2 dr, ...).
          value, weight = from_token(index, 1 + h - 2 * dr, 1 + w - 2 * dc)
          total, weights = total + value, weights + weight
      row.append(total / weights)                                  # [B, L, s, s, C]
    halves.append(jnp.stack(row, 3))                               # [B, L, s, 2, s, C]
  patch = jnp.stack(halves, 2)                                     # [B, L, 2, s, 2, s, C]
  return patch.reshape(b, n, p * p * c).astype(windows.dtype)
