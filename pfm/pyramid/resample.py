"""Down and Up between pyramid levels, in space and in time.

Space (Pyramidal Flow Matching, Sec. 3.2): Down(x, 2^k) is 2^k x 2^k average pooling (bilinear
resampling at factor 1/2 applied k times); Up is nearest-neighbour upsampling. Both act on the two
spatial axes just before the channel axis, so they take images ``[..., H, W, C]`` and videos
``[..., T, H, W, C]`` alike.

Time (TPDiff, Sec. 3.2-3.3): temporal Down averages groups of consecutive frames (frame pairs for
a factor of 2), temporal Up duplicates frames (nearest neighbour). They act on axis -4 of videos
``[..., T, H, W, C]``. ``down_video`` / ``up_video`` combine both: the spatiotemporal pyramid.

The functions use only array methods (``reshape``, ``mean``, ``repeat``), so the same code runs on
NumPy arrays in the data pipeline and on JAX arrays inside jitted steps: the data side and the
maths side cannot disagree on what a pyramid level is.
"""

from __future__ import annotations


def down(x, factor: int):
  """Down(x, factor): average pooling over ``factor x factor`` spatial blocks.

  Args:
    x: array ``[..., H, W, C]`` (NumPy or JAX), any float dtype.
    factor: a power of two >= 1; 1 returns ``x`` unchanged.

  Returns:
    ``[..., H / factor, W / factor, C]``, same dtype.

  Raises:
    ValueError: if H or W is not divisible by ``factor``.
  """
  if factor == 1:
    return x
  *lead, h, w, c = x.shape
  if h % factor or w % factor:
    raise ValueError(f"down: spatial size {h}x{w} is not divisible by {factor}")
  x = x.reshape(*lead, h // factor, factor, w // factor, factor, c)
  return x.mean(axis=(-4, -2)).astype(x.dtype)


def up(x, factor: int = 2):
  """Up(x): nearest-neighbour upsampling by ``factor`` on both spatial axes.

  Args:
    x: array ``[..., H, W, C]``.
    factor: integer >= 1.

  Returns:
    ``[..., H * factor, W * factor, C]``, same dtype; each input pixel becomes a
    ``factor x factor`` block of equal values.
  """
  if factor == 1:
    return x
  return x.repeat(factor, axis=-3).repeat(factor, axis=-2)


def down_time(x, factor: int):
  """Temporal Down: the mean of each group of ``factor`` consecutive frames.

  Args:
    x: video ``[..., T, H, W, C]`` (NumPy or JAX).
    factor: integer >= 1; 1 returns ``x`` unchanged.

  Returns:
    ``[..., T / factor, H, W, C]``, same dtype.

  Raises:
    ValueError: if T is not divisible by ``factor``.
  """
  if factor == 1:
    return x
  *lead, t, h, w, c = x.shape
  if t % factor:
    raise ValueError(f"down_time: {t} frames are not divisible by {factor}")
  return x.reshape(*lead, t // factor, factor, h, w, c).mean(axis=-4).astype(x.dtype)


def up_time(x, factor: int = 2):
  """Temporal Up: every frame repeated ``factor`` times, ``[..., T, H, W, C]`` -> ``[..., T *
  factor, H, W, C]``."""
  if factor == 1:
    return x
  return x.repeat(factor, axis=-4)


def down_video(x, spatial: int = 1, temporal: int = 1):
  """Down in space (``spatial x spatial`` pooling) and time (``temporal`` frames) at once.

  Args:
    x: ``[..., T, H, W, C]``; with ``temporal == 1`` images ``[..., H, W, C]`` work too.
    spatial, temporal: integer factors >= 1.

  Returns:
    ``[..., T / temporal, H / spatial, W / spatial, C]``.
  """
  return down_time(down(x, spatial), temporal)


def up_video(x, spatial: int = 1, temporal: int = 1):
  """Nearest-neighbour Up in space and time: the inverse layout of ``down_video``."""
  return up_time(up(x, spatial), temporal)
