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


def _adjacent_steps(frames: np.ndarray):
  """Per axis (rows, then columns): |steps| ``[n - 1, rest]`` between pixels j - 1 and j, and
  j = 1 .. n - 1."""
  x = np.asarray(frames, np.float64)
  for axis in (-3, -2):
    n = x.shape[axis]
    steps = np.moveaxis(np.abs(np.diff(x, axis=axis)), axis, 0).reshape(n - 1, -1)
    yield steps, np.arange(1, n)


def _check(frames: np.ndarray, periods) -> None:
  *_, h, w, _ = frames.shape
  for p in periods:
    if p < 2 or h % p or w % p or p >= min(h, w):
      raise ValueError(f"seams: patch size {p} must be >= 2, divide the frame size {h}x{w} and "
                       "be smaller")


def border_and_interior_steps(frames: np.ndarray, patch_size: int) -> tuple[float, float]:
  """Mean absolute steps across patch borders and inside patches.

  Args:
    frames: ``[..., H, W, C]`` frames, any real dtype (uint8 in [0, 255] or float).
    patch_size: p; at least 2, below and dividing H and W.

  Returns:
    ``(border, interior)``: mean |step| between horizontally or vertically adjacent pixels that
    lie in two patches, and in one patch, in the units of ``frames``.

  Raises:
    ValueError: if ``patch_size`` is below 2, not below the frame size or does not divide it.
  """
  _check(frames, [patch_size])
  sums, counts = np.zeros(2), np.zeros(2)
  for steps, j in _adjacent_steps(frames):
    for i, pairs in enumerate((j % patch_size == 0, j % patch_size != 0)):
      sums[i] += steps[pairs].sum()
      counts[i] += steps[pairs].size
  border, interior = sums / counts
  return float(border), float(interior)


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


def seam_ratios_by_period(frames: np.ndarray, periods) -> dict[int, float]:
  """The seam ratio of each grid of a spatial pyramid, told apart by where its borders fall.

  Stage k of a spatial pyramid works at 1 / 2^k of the full size, so its patch borders fall
  every ``p 2^k`` pixels of the full-size frame. The borders at multiples of a period but not of
  the next larger one belong to that period's grid and the finer ones only; their mean step over
  the mean step inside the finest patches says how much each grid shows (the largest period
  counts all its multiples). A coarse stage whose seams survive the later stages scores high at
  its period.

  Args:
    frames: ``[..., H, W, C]`` frames (uint8 or float).
    periods: patch sides at full size, e.g. ``(8, 16, 32)`` for patch 8 and 3 spatial stages;
      each below and dividing H and W, and each a multiple of the smaller ones.

  Returns:
    ``{period: ratio}`` in increasing period.

  Raises:
    ValueError: for a period below 2, one that is not below the frame size or does not divide
      it, or periods that do not nest.
  """
  periods = sorted(set(int(p) for p in periods))
  _check(frames, periods)
  if any(b % a for a, b in zip(periods, periods[1:])):
    raise ValueError(f"seams: periods {periods} do not nest")
  sums, counts = np.zeros(len(periods) + 1), np.zeros(len(periods) + 1)
  for steps, j in _adjacent_steps(frames):
    grid = np.zeros(len(j), int)          # 0: inside the finest patches; i + 1: periods[i]
    for i, p in enumerate(periods):
      grid[j % p == 0] = i + 1
    for g in range(len(periods) + 1):
      sums[g] += steps[grid == g].sum()
      counts[g] += steps[grid == g].size
  means = sums / counts
  if means[0] == 0.0:
    return {p: float("inf") if means[i + 1] > 0 else 1.0 for i, p in enumerate(periods)}
  return {p: float(means[i + 1] / means[0]) for i, p in enumerate(periods)}
