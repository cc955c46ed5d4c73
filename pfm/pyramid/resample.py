"""Down and Up between pyramid levels (Pyramidal Flow Matching, Sec. 3.2).

Down(x, 2^k) is 2^k x 2^k average pooling (bilinear resampling at factor 1/2 applied k times);
Up is nearest-neighbour upsampling by 2. Both act on the two spatial axes just before the
channel axis, so they take images ``[..., H, W, C]`` and videos ``[..., T, H, W, C]`` alike.

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


def level(x, k: int):
  """The clean pyramid level k of full-resolution ``x``: Down(x, 2^k) (paper Eq. 7 mean)."""
  return down(x, 2**k)


def start_mean(x, k: int):
  """Up(Down(x, 2^(k+1))) at level k's resolution: the stage start mean of Eq. (8)."""
  return up(down(x, 2 ** (k + 1)), 2)
