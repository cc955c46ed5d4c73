"""Patch-grid seams: how much more the image steps across the model's patch borders than inside.

A DiT in pixel space predicts each p x p patch from its own token; when neighbouring tokens
disagree, the frame steps at the patch borders and the patch grid shows. The *seam ratio* is the
mean absolute step between adjacent pixels that straddle a patch border (columns or rows
``k p - 1`` and ``k p``) divided by the mean absolute step between adjacent pixels inside a
patch, horizontal and vertical steps pooled:

    seam ratio = mean |x[.., k p] - x[.., k p - 1]| / mean |x[.., j + 1] - x[.., j]|, j + 1 != k p

Natural frames have no grid, so their ratio is about 1 (a real video's own ratio is the
reference: ``seam_ratio`` of the real clips); a frame with a brightness offset per patch scores
above 1, blur inside the patches also raises it, and blur across them lowers it. It is scale-free
(a uniform gain cancels) and needs no network.
"""

from __future__ import annotations

import numpy as np


def border_and_interior_steps(frames: np.ndarray, patch_size: int) -> tuple[float, float]:
  """Mean absolute steps across patch borders and inside patches.

  Args:
    frames: ``[..., H, W, C]`` frames, any real dtype (uint8 in [0, 255] or float).
    patch_size: p; must divide H and W and be at least 2.

  Returns:
    ``(border, interior)``: mean |step| between horizontally or vertically adjacent pixels that
    lie in two patches, and in one patch, in the units of ``frames``.

  Raises:
    ValueError: if ``patch_size`` is below 2 or does not divide the frame size.
  """
  *_, h, w, _ = frames.shape
  p = patch_size
  if p < 2 or h % p or w % p:
    raise ValueError(f"seams: patch size {p} must be >= 2 and divide the frame size {h}x{w}")
  x = np.asarray(frames, np.float64)
  border_sum = interior_sum = 0.0
  border_count = interior_count = 0
  for axis, n in ((-3, h), (-2, w)):
    steps = np.abs(np.diff(x, axis=axis))
    steps = np.moveaxis(steps, axis, 0).reshape(n - 1, -1)            # [pair, rest]
    border = (np.arange(1, n) % p) == 0                               # pair (j - 1, j), j = k p
    border_sum += steps[border].sum()
    interior_sum += steps[~border].sum()
    border_count += steps[border].size
    interior_count += steps[~border].size
  return border_sum / border_count, interior_sum / interior_count


def seam_ratio(frames: np.ndarray, patch_size: int) -> float:
  """Border steps over interior steps on the p x p patch grid (about 1 without seams).

  Args:
    frames: ``[..., H, W, C]`` frames (uint8 or float).
    patch_size: the model's patch size p at the frame's resolution.

  Returns:
    The ratio, >= 0; ``inf`` for frames that are constant inside every patch but not across.

  Raises:
    ValueError: as `border_and_interior_steps`.
  """
  border, interior = border_and_interior_steps(frames, patch_size)
  if interior == 0.0:
    return float("inf") if border > 0.0 else 1.0
  return float(border / interior)
