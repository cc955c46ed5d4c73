"""Token layout of one training or sampling sample: the temporal pyramid (Sec. 3.3-3.4).

When a sample targets frame unit ``i`` at pyramid stage ``k`` (stage k works at resolution
H / 2^k; k = 0 is full resolution, k = K - 1 the coarsest), its history condition is, Eq. (16)/(17):

  ... -> Down(x^{i-2}, 2^{k+1}) -> Down(x^{i-1}, 2^k) -> x^i at stage k,

every older unit staying at the lowest level K - 1. The functions here cut those CLEAN pyramid
levels and turn them into tokens with the metadata the model needs (frame index for the
blockwise causal mask and temporal RoPE, spatial positions for spatial RoPE). No noise is drawn
here: corrupting the history and interpolating the current unit happen on device.

Positions follow Sec. 3.4: the spatial pyramid *extrapolates* (the current unit at stage k uses
the integer grid of its own token size), the temporal pyramid *interpolates* (a lower-resolution
history unit places its token centres on the current unit's grid).

Everything is pure NumPy on host arrays and is shared by the training pipeline
(``pfm.data.pipeline``) and the sampler, so both lay tokens out identically; the token maths
itself (``patchify``, positions, start means on tokens) is ``pfm.pyramid.tokens``.
"""

from __future__ import annotations

import numpy as np

from pfm.pyramid import tokens as tokens_lib


def check_sizes(height: int, width: int, patch_size: int, num_stages: int) -> None:
  """Checks that every pyramid level of a ``height x width`` frame tiles into patches.

  Level l has size ``(height / 2^l, width / 2^l)`` for l in [0, K - 1] and must be divisible by
  ``patch_size``; the start mean of the coarsest stage needs ``Down(x, 2^K)`` too.

  Raises:
    ValueError: if ``height`` or ``width`` is not divisible by ``patch_size * 2^(K-1)`` and by
      ``2^K``, or if ``num_stages < 1`` or ``patch_size < 1``.
  """
  if num_stages < 1 or patch_size < 1:
    raise ValueError(f"need num_stages >= 1 and patch_size >= 1, got {num_stages}, {patch_size}")
  factor = np.lcm(patch_size * 2 ** (num_stages - 1), 2**num_stages)
  if height % factor or width % factor:
    raise ValueError(
        f"frame size {height}x{width} must be divisible by {factor} for {num_stages} pyramid "
        f"stages with patch size {patch_size}")


def level_token_grid(height: int, width: int, level: int, p: int) -> tuple[int, int]:
  """Token grid ``(rows, cols)`` of pyramid level ``level`` of a ``height x width`` frame."""
  return height // 2**level // p, width // 2**level // p


def history_levels(i: int, k: int, num_stages: int, *, compress: bool = True) -> list[int]:
  """Pyramid levels of the history units 0..i-1 for current unit ``i`` at stage ``k`` (Eq. 16).

  Unit ``i - 1`` is at level ``k``, unit ``i - 2`` at ``k + 1``, ..., capped at ``K - 1``.
  Without ``compress`` every history unit is at full resolution (level 0, Eq. 15's
  uncompressed history; the ablation of Pyramidal Flow Fig. 8).

  Args:
    i: index of the current unit (>= 0); i = 0 has no history.
    k: stage of the current unit, in [0, num_stages - 1].
    num_stages: K.
    compress: the compressed history of Eq. 16 (default) or full resolution.

  Returns:
    ``i`` ints, in temporal order (oldest first); non-increasing.

  Raises:
    ValueError: if ``i < 0`` or ``k`` is out of range.
  """
  if i < 0 or not 0 <= k < num_stages:
    raise ValueError(f"history_levels: need i >= 0 and 0 <= k < {num_stages}, got i={i}, k={k}")
  if not compress:
    return [0] * i
  return [min(k + (i - 1 - j), num_stages - 1) for j in range(i)]


def _check_spatial(pyramid) -> None:
  if max(pyramid.temporal_factors) > 1 or any(
      f != 2**k for k, f in enumerate(pyramid.spatial_factors)):
    raise ValueError("the autoregressive layout needs a spatial pyramid halving the resolution "
                     f"per stage, got spatial {pyramid.spatial_factors}, temporal "
                     f"{pyramid.temporal_factors}")


def layout_history(history_frames: np.ndarray, k: int, pyramid,
                   p: int, *, compress: bool = True) -> dict[str, np.ndarray]:
  """Tokens of the clean history units 0..i-1 for a current unit at stage ``k`` (Eq. 16-17).

  Args:
    history_frames: float32 ``[i, H, W, C]`` full-resolution frames, oldest first, values in
      [-1, 1]; ``i`` may be 0.
    k: stage of the current unit.
    pyramid: the run's spatial ``pfm.pyramid.stages.Pyramid`` (K stages, resolution halved per
      stage); a history unit at level l is ``pyramid.level(x, l)``.
    p: patch size.
    compress: levels by `history_levels` (Eq. 16); False keeps every unit at full resolution.

  Returns:
    dict with ``n = sum_j tokens(level_j)`` rows, in temporal order:
      ``tokens``: float32 ``[n, p * p * C]``, patchify(Down(x^j, 2^level_j));
      ``causal_block``: int32 ``[n]``, the unit index j of each token;
      ``positions``: float32 ``[n, 2]``, ``grid_positions`` on the current unit's grid.

  Raises:
    ValueError: on sizes that do not tile (``check_sizes``), a bad ``k``, or a pyramid with a
      frame-rate reduction.
  """
  _check_spatial(pyramid)
  num_stages = pyramid.num_stages
  i, height, width, c = history_frames.shape
  check_sizes(height, width, p, num_stages)
  levels = history_levels(i, k, num_stages, compress=compress)
  current_grid = level_token_grid(height, width, k, p)
  tokens, causal_block, positions = [], [], []
  start = 0
  while start < i:  # Runs of units at the same level, cut in one call each.
    lvl = levels[start]
    stop = start + 1
    while stop < i and levels[stop] == lvl:
      stop += 1
    run = pyramid.level(history_frames[start:stop].astype(np.float32), lvl)
    run_tokens = tokens_lib.patchify(run, p)  # [units, n_lvl, P]
    n_lvl = run_tokens.shape[1]
    tokens.append(run_tokens.reshape(-1, run_tokens.shape[-1]))
    causal_block.append(np.repeat(np.arange(start, stop, dtype=np.int32), n_lvl))
    grid = tokens_lib.grid_positions(level_token_grid(height, width, lvl, p), current_grid)
    positions.append(np.tile(grid, (stop - start, 1)))
    start = stop
  if not tokens:
    return dict(tokens=np.zeros((0, p * p * c), np.float32),
                causal_block=np.zeros((0,), np.int32),
                positions=np.zeros((0, 2), np.float32))
  return dict(tokens=np.concatenate(tokens), causal_block=np.concatenate(causal_block),
              positions=np.concatenate(positions))


def layout_sample(frames: np.ndarray, i: int, k: int, pyramid,
                  p: int, *, compress_history: bool = True) -> dict[str, np.ndarray]:
  """Unpacked per-token arrays of one training sample: history tokens, then the current unit.

  Args:
    frames: float32 ``[T, H, W, C]`` clean clip in [-1, 1], T > i (frames after i are unused).
    i: index of the current unit, in [0, T - 1].
    k: stage of the current unit, in [0, K - 1].
    pyramid: the run's spatial ``pfm.pyramid.stages.Pyramid`` (see `layout_history`).
    p: patch size.
    compress_history: the history's levels (`history_levels`).

  Returns:
    dict of arrays with ``n = tokens_per_sample(i, k, ...)`` rows:
      ``clean_end``: float32 ``[n, P]``: for the current unit patchify(Down(x^i, 2^k)) (the
        stage's end point mean, Eq. 8); for history units their clean tokens (Eq. 16).
      ``clean_start``: float32 ``[n, P]``: for the current unit patchify(Up(Down(x^i, 2^(k+1))))
        at level k's resolution (``Pyramid.clean_start``; zero at the coarsest stage); zeros
        for history.
      ``causal_block``: int32 ``[n]``, the unit index of each token.
      ``positions``: float32 ``[n, 2]``, (row, col) on the current unit's token grid.
      ``stage``: int32 ``[n]``, k for every token.
      ``is_target``: int32 ``[n]``, 1 for the current unit's tokens, 0 for history.
      ``temporal_positions``: float32 ``[n]``, the RoPE position: the unit index.
      ``temporal_block_offset``: int32 ``[n]``, zeros (no temporal jump blocks here).
    with ``P = p * p * C``. The coarsest stage's start mean is zero (``Pyramid.clean_start``).

  Raises:
    ValueError: if ``i`` or ``k`` is out of range, the frame size does not tile, or the pyramid
      has a frame-rate reduction.
  """
  _check_spatial(pyramid)
  num_stages = pyramid.num_stages
  t, height, width, _ = frames.shape
  if not 0 <= i < t or not 0 <= k < num_stages:
    raise ValueError(f"layout_sample: need 0 <= i < {t} and 0 <= k < {num_stages}, "
                     f"got i={i}, k={k}")
  check_sizes(height, width, p, num_stages)
  frames = frames.astype(np.float32)
  history = layout_history(frames[:i], k, pyramid, p, compress=compress_history)
  level = pyramid.level(frames[i], k)
  end = tokens_lib.patchify(level, p)
  start = tokens_lib.patchify(pyramid.clean_start(level, k), p)
  n_cur, n_hist = end.shape[0], history["tokens"].shape[0]
  grid = level_token_grid(height, width, k, p)
  causal_block = np.concatenate([history["causal_block"], np.full(n_cur, i, np.int32)])
  return dict(
      clean_end=np.concatenate([history["tokens"], end]),
      clean_start=np.concatenate([np.zeros_like(history["tokens"]), start]),
      causal_block=causal_block,
      positions=np.concatenate([history["positions"], tokens_lib.grid_positions(grid, grid)]),
      stage=np.full(n_hist + n_cur, k, np.int32),
      is_target=np.concatenate([np.zeros(n_hist, np.int32), np.ones(n_cur, np.int32)]),
      temporal_positions=causal_block.astype(np.float32),
      temporal_block_offset=np.zeros(n_hist + n_cur, np.int32),
  )


def layout_clip(frames: np.ndarray, k: int, pyramid, p: int, *,
                consistent_rope: bool = True) -> dict[str, np.ndarray]:
  """Unpacked per-token arrays of one full-sequence training sample: a whole clip at stage k.

  Full-sequence mode (TPDiff; the spatial pyramid applied frame-wise, beyond Pyramidal Flow's
  autoregressive use, its Appendix D): every frame of the clip is noised to the same level and
  all frames are one unit (``causal_block`` 0), so attention over them is bidirectional. Stage k
  works at ``pyramid.level`` (resolution / 2^k and/or frame rate / f_k).

  Args:
    frames: float32 ``[T, H, W, C]`` clean clip in [-1, 1]; T divisible by the coarsest stage's
      temporal factor.
    k: the stage, in [0, K - 1].
    pyramid: a ``pfm.pyramid.stages.Pyramid``.
    p: patch size.
    consistent_rope: stage-consistent temporal positions (TPDiff Eq. 14); False numbers the
      stage's frames 0, 1, 2, ...

  Returns:
    dict of arrays with ``n = T_k * (H_k / p) * (W_k / p)`` rows in (frame, row, col) order:
      ``clean_end``: float32 ``[n, P]``, patchify(D_k) with D_k = ``pyramid.level(frames, k)``.
      ``clean_start``: float32 ``[n, P]``, patchify(``pyramid.clean_start(D_k, k)``): Up(Down(D_k))
        across the jump into stage k (TPDiff Eq. 7), zero at the coarsest stage.
      ``causal_block``: int32 ``[n]``, zeros (one unit).
      ``temporal_positions``: float32 ``[n]``, ``pyramid.temporal_positions`` of each token's frame.
      ``positions``: float32 ``[n, 2]``, the integer (row, col) grid of stage k (extrapolation).
      ``stage``: int32 ``[n]``, k. ``is_target``: int32 ``[n]``, ones.
      ``temporal_block_offset``: int32 ``[n]``: offset (<= 0) from each token to the first token
        of its temporal jump block, the tokens at the same place in the f frames that temporal
        Up duplicates from one coarse frame; the objective averages over these blocks to turn a
        clean prediction into the start mean. Zero at the coarsest stage and without a temporal
        jump.

  Raises:
    ValueError: if ``k`` is out of range or the clip does not divide into stage k's size.
  """
  if not 0 <= k < pyramid.num_stages:
    raise ValueError(f"layout_clip: stage {k} outside [0, {pyramid.num_stages - 1}]")
  clean = pyramid.level(frames.astype(np.float32), k)
  num_frames, h, w, _ = clean.shape
  if h % p or w % p:
    raise ValueError(f"layout_clip: stage {k} size {h}x{w} is not divisible by patch size {p}")
  start = pyramid.clean_start(clean, k)
  per_frame = (h // p) * (w // p)
  n = num_frames * per_frame
  ft = pyramid.jump(k)[1] if k < pyramid.num_stages - 1 else 1
  frame_of_token = np.repeat(np.arange(num_frames), per_frame)
  grid = tokens_lib.grid_positions((h // p, w // p), (h // p, w // p))
  return dict(
      clean_end=tokens_lib.patchify(clean, p).reshape(n, -1),
      clean_start=tokens_lib.patchify(start, p).reshape(n, -1),
      causal_block=np.zeros(n, np.int32),
      positions=np.tile(grid, (num_frames, 1)),
      stage=np.full(n, k, np.int32),
      is_target=np.ones(n, np.int32),
      temporal_positions=np.repeat(
          pyramid.temporal_positions(num_frames, k, consistent_rope), per_frame),
      temporal_block_offset=(-(frame_of_token % ft) * per_frame).astype(np.int32),
  )


def clip_tokens(num_frames: int, *, height: int, width: int, patch_size: int, pyramid,
                k: int = 0) -> int:
  """Tokens of a ``num_frames``-frame clip at stage k (``layout_clip``); stage 0 is the most."""
  shape = pyramid.stage_shape((num_frames, height, width, 3), k)
  return shape[0] * (shape[1] // patch_size) * (shape[2] // patch_size)


def tokens_per_sample(i: int, k: int, *, height: int, width: int, patch_size: int,
                      num_stages: int, compress_history: bool = True) -> int:
  """Number of video tokens ``layout_sample`` produces for current unit ``i`` at stage ``k``."""
  levels = history_levels(i, k, num_stages, compress=compress_history) + [k]
  return sum(int(np.prod(level_token_grid(height, width, lvl, patch_size))) for lvl in levels)


def max_tokens_per_sample(num_frames: int, *, height: int, width: int, patch_size: int,
                          num_stages: int, compress_history: bool = True) -> int:
  """Worst case of ``tokens_per_sample`` over i in [0, num_frames - 1] and every stage k.

  Raises:
    ValueError: if the frame size does not tile (``check_sizes``) or ``num_frames < 1``.
  """
  if num_frames < 1:
    raise ValueError(f"num_frames must be >= 1, got {num_frames}")
  check_sizes(height, width, patch_size, num_stages)
  return max(
      tokens_per_sample(i, k, height=height, width=width, patch_size=patch_size,
                        num_stages=num_stages, compress_history=compress_history)
      for i in range(num_frames) for k in range(num_stages))
