"""Video tokens: patches of a frame, their positions, and the start mean computed on tokens.

Pure array maths (NumPy or JAX, array methods only), shared by the data layout
(``pfm.data.layout``), the objective on device (``pfm.objective``) and the sampler, so a token
means the same thing everywhere. A token is one ``p x p`` patch of a frame, flattened in
``(p, p, C)`` order; tokens run row-major over the frame's ``(H / p, W / p)`` grid.
"""

from __future__ import annotations

import numpy as np

from pfm.pyramid import resample


def patchify(x, p: int):
  """Cuts images into non-overlapping ``p x p`` patches, one token per patch.

  Args:
    x: ``[..., H, W, C]`` (NumPy or JAX), any dtype.
    p: patch size; must divide H and W.

  Returns:
    ``[..., (H / p) * (W / p), p * p * C]``, same dtype. Tokens run row-major over the
    ``(H / p, W / p)`` token grid; each token is its patch flattened in ``(p, p, C)`` order.

  Raises:
    ValueError: if ``p`` does not divide H or W.
  """
  *lead, h, w, c = x.shape
  if h % p or w % p:
    raise ValueError(f"patchify: size {h}x{w} is not divisible by patch size {p}")
  x = x.reshape(*lead, h // p, p, w // p, p, c).swapaxes(-4, -3)
  return x.reshape(*lead, (h // p) * (w // p), p * p * c)


def unpatchify(tokens, p: int, h: int, w: int):
  """Inverse of ``patchify``.

  Args:
    tokens: ``[..., (h / p) * (w / p), p * p * C]`` (NumPy or JAX).
    p: patch size.
    h: image height in pixels (a multiple of ``p``).
    w: image width in pixels (a multiple of ``p``).

  Returns:
    ``[..., h, w, C]``, same dtype.

  Raises:
    ValueError: if the token count or token size does not match ``(p, h, w)``.
  """
  *lead, n, size = tokens.shape
  if h % p or w % p or n != (h // p) * (w // p) or size % (p * p):
    raise ValueError(f"unpatchify: tokens {tokens.shape} do not tile a {h}x{w} image with "
                     f"patch size {p}")
  c = size // (p * p)
  x = tokens.reshape(*lead, h // p, w // p, p, p, c).swapaxes(-4, -3)
  return x.reshape(*lead, h, w, c)


def patch_clean_start(tokens, p: int):
  """Up(Down(., 2)) applied inside each token: the start mean Û implied by clean tokens D̂.

  Because the patch side ``p`` is even, the 2x2 blocks of Down/Up never straddle two tokens, so
  the stage start mean of Eq. (8) can be computed token by token.

  Args:
    tokens: ``[..., n, p * p * C]`` (NumPy or JAX), in ``patchify`` order.
    p: patch size, even.

  Returns:
    same shape and dtype.
  """
  if p % 2:
    raise ValueError(f"patch_clean_start needs an even patch size, got {p}")
  *lead, n, size = tokens.shape
  patches = tokens.reshape(*lead, n, p, p, size // (p * p))
  return resample.up(resample.down(patches, 2), 2).reshape(tokens.shape)


def grid_positions(level_size_hw: tuple[int, int],
                   current_size_hw: tuple[int, int]) -> np.ndarray:
  """Spatial (row, col) positions of a token grid on the current unit's grid (Sec. 3.4).

  Token ``(r, c)`` of a ``level_size_hw`` grid sits at
  ``((r + 0.5) * H_cur / H_lvl - 0.5, (c + 0.5) * W_cur / W_lvl - 0.5)``: its centre mapped onto
  the ``current_size_hw`` grid. When both sizes are equal this is the integer grid
  ``0..h-1 x 0..w-1`` exactly, which is what the current unit of any stage uses (extrapolation:
  a lower-resolution stage keeps the integer grid of its own size). A lower-resolution history
  unit gets fractional positions (interpolation), e.g. a 2x2 grid on a 4x4 grid -> {0.5, 2.5}.

  Args:
    level_size_hw: ``(h, w)`` token grid of the unit being placed.
    current_size_hw: ``(h, w)`` token grid of the current unit.

  Returns:
    float32 ``[h * w, 2]``, row-major over the placed grid (the order of ``patchify``).
  """
  (h, w), (hc, wc) = level_size_hw, current_size_hw
  rows = (np.arange(h, dtype=np.float64) + 0.5) * (hc / h) - 0.5
  cols = (np.arange(w, dtype=np.float64) + 0.5) * (wc / w) - 0.5
  grid = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1)
  return grid.reshape(h * w, 2).astype(np.float32)
