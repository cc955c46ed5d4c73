"""Sliced Wasserstein distance of Laplacian-pyramid patches (Karras et al., 2018, Sec. 5 and
Appendix D): how far generated frames are from real ones at each scale, without a network.

Each frame is decomposed into a Laplacian pyramid (a 5-tap binomial blur [1, 4, 6, 4, 1] / 16 and
2x decimation per level, the coarsest level the low-pass residual). From every level, 7x7x3
patches are taken at random places (``patches_per_frame`` per frame); each level's patch set is
normalised per colour channel to zero mean and unit variance (each set by its own statistics,
as in the paper). The distance between two sets at one level is the sliced Wasserstein distance:
the mean, over random unit directions, of the mean absolute difference of the sorted projections
(the 1-D Wasserstein-1 distance), with the larger set subsampled to the size of the smaller.
Lower is better; the paper reports it x 10^3, and so does ``sliced_wasserstein``'s ``"avg"``.
Small levels (fine detail) and large levels (coarse layout) are reported apart because they
measure different failures (noise and texture against structure).
"""

from __future__ import annotations

import numpy as np

PATCH = 7  # neighbourhood side (Karras et al.: 7x7)
_BINOMIAL = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _blur(x: np.ndarray) -> np.ndarray:
  """Separable 5-tap binomial blur of ``[N, H, W, C]`` with reflected borders."""
  for axis in (1, 2):
    pad = [(0, 0)] * 4
    pad[axis] = (2, 2)
    xp = np.pad(x, pad, mode="reflect")
    n = x.shape[axis]
    x = sum(w * np.take(xp, np.arange(i, i + n), axis=axis) for i, w in enumerate(_BINOMIAL))
  return x


def _upsample(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """2x upsampling by zero insertion and the blur (x4 gain), cropped to ``shape``."""
  n, h, w, c = x.shape
  up = np.zeros((n, 2 * h, 2 * w, c), x.dtype)
  up[:, ::2, ::2] = x
  return 4.0 * _blur(up)[:, :shape[0], :shape[1]]


def laplacian_pyramid(frames: np.ndarray, num_levels: int) -> list[np.ndarray]:
  """Band-pass levels of float ``[N, H, W, C]`` frames, finest first; the last is the low-pass.

  Raises:
    ValueError: if a level would be smaller than one patch.
  """
  levels, x = [], np.asarray(frames, np.float64)
  for _ in range(num_levels - 1):
    down = _blur(x)[:, ::2, ::2]
    levels.append(x - _upsample(down, x.shape[1:3]))
    x = down
  levels.append(x)
  if min(levels[-1].shape[1:3]) < PATCH:
    raise ValueError(f"{num_levels} pyramid levels of {frames.shape[1]}x{frames.shape[2]} "
                     f"frames leave {levels[-1].shape[1]}x{levels[-1].shape[2]}, under one "
                     f"{PATCH}x{PATCH} patch")
  return levels


def default_num_levels(height: int, width: int) -> int:
  """Levels down to the last one of at least 16 pixels on its short side (the paper stops at
  16x16): 3 for 64x64 frames, 2 for 32x32."""
  levels, side = 1, min(height, width)
  while side // 2 >= 16:
    side //= 2
    levels += 1
  return levels


def patch_descriptors(level: np.ndarray, patches_per_frame: int,
                      rng: np.random.Generator) -> np.ndarray:
  """``patches_per_frame`` random 7x7 patches of each frame of ``level`` ``[N, H, W, C]``,
  normalised per channel over the set: float ``[N * patches_per_frame, 7 * 7 * C]``."""
  n, h, w, c = level.shape
  ys = rng.integers(0, h - PATCH + 1, (n, patches_per_frame))
  xs = rng.integers(0, w - PATCH + 1, (n, patches_per_frame))
  offsets = np.arange(PATCH)
  rows = ys[..., None, None] + offsets[:, None]  # [n, P, 7, 1]
  cols = xs[..., None, None] + offsets[None, :]  # [n, P, 1, 7]
  patches = level[np.arange(n)[:, None, None, None], rows, cols]  # [n, P, 7, 7, C]
  patches = patches.reshape(-1, PATCH * PATCH, c)
  patches = (patches - patches.mean(axis=(0, 1))) / (patches.std(axis=(0, 1)) + 1e-8)
  return patches.reshape(len(patches), -1)


def sliced_wasserstein_1(a: np.ndarray, b: np.ndarray, num_directions: int,
                         rng: np.random.Generator) -> float:
  """Sliced Wasserstein-1 distance of two ``[N, D]`` sets (the larger one subsampled)."""
  n = min(len(a), len(b))
  a = a[rng.permutation(len(a))[:n]]
  b = b[rng.permutation(len(b))[:n]]
  directions = rng.standard_normal((a.shape[1], num_directions))
  directions /= np.linalg.norm(directions, axis=0, keepdims=True)
  pa, pb = np.sort(a @ directions, axis=0), np.sort(b @ directions, axis=0)
  return float(np.mean(np.abs(pa - pb)))


def sliced_wasserstein(frames: np.ndarray, references: np.ndarray, *,
                       num_levels: int | None = None, patches_per_frame: int = 128,
                       num_directions: int = 512, seed: int = 0) -> dict[str, float]:
  """SWD of Laplacian-pyramid patches between two frame sets, per level and averaged.

  Args:
    frames, references: uint8 ``[N, H, W, 3]`` frames (pixels 0..255, the same H, W); the
      generated frames and the real ones. Video clips are passed as their frames.
    num_levels: pyramid levels; None = ``default_num_levels``.
    patches_per_frame: patches drawn from each frame at each level (the paper: 128).
    num_directions: random projections (the paper: 512, as 4 x 128).
    seed: seed of the patch positions, the subsampling and the directions.

  Returns:
    ``{"level_{side}": SWD x 10^3 for the level of that side, finest first, ..., "avg": their
    mean}``; sides are the short side of each level (64, 32, 16 for 64x64 frames).

  Raises:
    ValueError: for frame sets of different sizes or a pyramid too deep for them.
  """
  frames, references = np.asarray(frames), np.asarray(references)
  if frames.shape[1:] != references.shape[1:]:
    raise ValueError(f"frames {frames.shape[1:]} and references {references.shape[1:]} differ")
  num_levels = num_levels or default_num_levels(*frames.shape[1:3])
  rng = np.random.default_rng(seed)
  to_float = lambda x: x.astype(np.float64) / 127.5 - 1.0
  pyr_a = laplacian_pyramid(to_float(frames), num_levels)
  pyr_b = laplacian_pyramid(to_float(references), num_levels)
  out = {}
  for level_a, level_b in zip(pyr_a, pyr_b):
    da = patch_descriptors(level_a, patches_per_frame, rng)
    db = patch_descriptors(level_b, patches_per_frame, rng)
    out[f"level_{min(level_a.shape[1:3])}"] = 1e3 * sliced_wasserstein_1(da, db, num_directions,
                                                                         rng)
  out["avg"] = float(np.mean(list(out.values())))
  return out
