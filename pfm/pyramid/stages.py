"""A pyramid: its stages' sizes in space and time, their windows, jumps and diffusion form.

One description serves the three pyramids of pfm:

* spatial (Pyramidal Flow): stage k works at resolution H / 2^k, every jump is a 2x2 block;
* temporal (TPDiff Sec. 3.2): stage k works at a reduced frame rate; the reduction schedule gives
  the frame-rate factor of every jump (TPDiff Table 2: 2 per stage, 4, or the non-uniform 4-2 and
  2-4, listed in sampling order, coarsest jump first), every jump is a block of duplicated frames;
* spatiotemporal (beyond both papers): both at once, e.g. 2x2x2 blocks.

Stage k = 0 is the full-size stage and k = K - 1 the coarsest (``pfm.pyramid.windows``). The
windows follow from a partition of the time axis (TPDiff Table 2, "1-1-1", "2-1-1", "1-1-2") and
the jump relation for each jump's block correlation gamma, which defaults to the smallest valid
value -1/(m - 1) (Pyramidal Flow's -1/3 for 2x2, TPDiff's -1 for frame pairs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from pfm.pyramid import diffusions
from pfm.pyramid import renoise as renoise_lib
from pfm.pyramid import resample
from pfm.pyramid import windows as windows_lib


TIMESTEPS = ("noise_level", "released")


@dataclasses.dataclass(frozen=True)
class Pyramid:
  """Static description of a pyramid (hashable, so jit can close over it).

  Attributes:
    windows: ``((s_k, e_k), ...)`` for k = 0..K-1.
    spatial_factors: stage k's spatial Down factor relative to full size (1 at k = 0).
    temporal_factors: stage k's frame-rate reduction relative to full rate (1 at k = 0).
    correlations: in-block correlation (the papers' gamma) of the jump into stage k (from
      k + 1), k = 0..K-2.
    diffusion: ``"flow_matching"`` or ``"ddim"``.
    timestep_windows: ``((c_k, d_k), ...)``: the time the model is conditioned on runs from c_k
      to d_k through stage k (`model_time`); None: the noise level itself (the windows). Pyramid
      Flow's released models read stage-unique ranges
      (``pfm.pyramid.windows.released_timestep_windows``).
  """

  windows: tuple[tuple[float, float], ...]
  spatial_factors: tuple[int, ...]
  temporal_factors: tuple[int, ...]
  correlations: tuple[float, ...]
  diffusion: str = "flow_matching"
  timestep_windows: tuple[tuple[float, float], ...] | None = None

  @property
  def num_stages(self) -> int:
    return len(self.windows)

  @property
  def noise_schedule(self) -> diffusions.NoiseSchedule:
    return diffusions.get(self.diffusion).noise_schedule

  def model_time(self, t, k: int):
    """The time the model is conditioned on at global time ``t`` of stage k (the same stage time
    ``t' = (t - s_k) / (e_k - s_k)`` on the model's window); ``t`` itself without
    ``timestep_windows``. Scalars or arrays, NumPy or JAX."""
    if self.timestep_windows is None:
      return t
    (s, e), (c, d) = self.windows[k], self.timestep_windows[k]
    return c + (t - s) / (e - s) * (d - c)

  def jump(self, k: int) -> tuple[int, int]:
    """``(spatial, temporal)`` upsampling factors from stage k + 1 into stage k (k < K - 1)."""
    return (self.spatial_factors[k + 1] // self.spatial_factors[k],
            self.temporal_factors[k + 1] // self.temporal_factors[k])

  def stage_shape(self, shape: Sequence[int], k: int) -> tuple[int, ...]:
    """Stage k's size of a full-size video ``[T, H, W, C]`` (or image ``[H, W, C]``)."""
    *lead, h, w, c = shape
    fs = self.spatial_factors[k]
    if lead:
      lead[-1] //= self.temporal_factors[k]
    return (*lead, h // fs, w // fs, c)

  def level(self, x, k: int):
    """The clean data at stage k: Down(x) by stage k's factors (Pyramidal Flow Eq. 7, TPDiff
    Eq. 8 mean). ``x`` is full-size ``[..., T, H, W, C]`` (or an image, without temporal
    reduction); NumPy or JAX."""
    return resample.down_video(x, self.spatial_factors[k], self.temporal_factors[k])

  def clean_start(self, clean_k, k: int):
    """Up(Down(D_k)) across the jump into stage k: the start mean of stage k (Pyramidal Flow
    Eq. 8, TPDiff Eq. 7), from ``clean_k`` = D_k at stage k's size. Zero at the coarsest stage:
    the sampler starts it from N(0, sigma_{s_{K-1}}^2 I), so training does too."""
    if k == self.num_stages - 1:
      return clean_k * 0
    fs, ft = self.jump(k)
    return resample.up_video(resample.down_video(clean_k, fs, ft), fs, ft)

  def temporal_positions(self, num_frames_k: int, k: int, consistent: bool = True) -> np.ndarray:
    """RoPE temporal positions of stage k's frames: stage-consistent (TPDiff Eq. 14).

    Frame j of a stage whose frames average ``f`` full-rate frames (temporal Down) stands for
    full-rate frames f j .. f j + f - 1, so it gets their mean position f j + (f - 1) / 2; after
    temporal Up the duplicated frames get f j, ..., f j + f - 1, whose mean it is. Eq. (14)
    writes the same scaling as n 2^(m - i) for frames picked rather than averaged.

    Args:
      num_frames_k: frames at stage k.
      k: the stage.
      consistent: False gives 0, 1, 2, ... at every stage (the misaligned ablation).

    Returns:
      float32 ``[num_frames_k]``.
    """
    j = np.arange(num_frames_k, dtype=np.float64)
    if not consistent:
      return j.astype(np.float32)
    f = self.temporal_factors[k]
    return (f * j + (f - 1) / 2).astype(np.float32)

  def renoise(self, key, x_end_coarse, k: int, *, corrective: bool = True):
    """The jump from stage k + 1 into stage k (``pfm.pyramid.renoise.renoise``)."""
    fs, ft = self.jump(k)
    return renoise_lib.renoise(key, x_end_coarse, self.windows[k][0], self.windows[k + 1][1],
                               self.correlations[k], self.noise_schedule, spatial=fs, temporal=ft,
                               corrective=corrective)


def parse_factors(frame_rate_schedule: str | Sequence[int] | int,
                  num_jumps: int) -> tuple[int, ...]:
  """A frame-rate reduction schedule in sampling order: "2" -> (2, 2), "4-2" -> (4, 2).

  Args:
    frame_rate_schedule: "" or None (no temporal pyramid: all 1), one factor for every jump
      ("2", 4), or one per jump separated by "-" ("4-2"), coarsest jump first.
    num_jumps: K - 1.

  Raises:
    ValueError: for a wrong count or a factor that is not a power of two >= 1.
  """
  if frame_rate_schedule in ("", None):
    return (1,) * num_jumps
  if isinstance(frame_rate_schedule, str):
    parts = [int(p) for p in frame_rate_schedule.split("-")]
  elif isinstance(frame_rate_schedule, int):
    parts = [frame_rate_schedule]
  else:
    parts = [int(p) for p in frame_rate_schedule]
  if len(parts) == 1:
    parts = parts * num_jumps
  if len(parts) != num_jumps or any(p < 1 or p & (p - 1) for p in parts):
    raise ValueError(f"frame-rate schedule {frame_rate_schedule!r}: need 1 or {num_jumps} powers "
                     "of two (one per jump, coarsest first)")
  return tuple(parts)


def parse_partition(partition: str | Sequence[float] | None, num_stages: int):
  """"2-1-1" -> (2.0, 1.0, 1.0); "" or None -> uniform. Raises ValueError for a wrong count."""
  if partition in ("", None):
    return (1.0,) * num_stages
  parts = ([float(p) for p in partition.split("-")] if isinstance(partition, str)
           else [float(p) for p in partition])
  if len(parts) != num_stages:
    raise ValueError(f"partition {partition!r} needs {num_stages} parts, one per stage")
  return tuple(parts)


def split_steps(total_steps: int, partition, num_stages: int) -> tuple[int, ...]:
  """Sampling steps per stage, coarsest first, in proportion to the partition of the time axis.

  TPDiff samples a fixed total (30 in its Table 3) split over the stages as the partition splits
  the trajectory: (30, "1-1-1") -> (10, 10, 10); (30, "2-1-1") -> (16, 7, 7). Rounding goes to the
  coarsest stages, which are the cheapest.

  Raises:
    ValueError: if there are fewer steps than stages, or for a malformed partition.
  """
  if total_steps < num_stages:
    raise ValueError(f"{total_steps} steps cannot cover {num_stages} stages")
  parts = np.asarray(parse_partition(partition, num_stages))
  steps = np.maximum(np.floor(total_steps * parts / parts.sum()).astype(int), 1)
  for i in range(total_steps - int(steps.sum())):
    steps[i % num_stages] += 1
  return tuple(int(n) for n in steps)


def make_pyramid(num_stages: int, *, spatial: bool = True, frame_rate_schedule="",
                 partition=None, correlation: float | None = None,
                 diffusion: str = "flow_matching", timesteps: str = "noise_level") -> Pyramid:
  """Builds a ``Pyramid``.

  Args:
    num_stages: K >= 1; K = 1 is vanilla full-size diffusion.
    spatial: halve the resolution at every coarser stage (2x2 blocks).
    frame_rate_schedule: temporal reduction per jump in sampling order (``parse_factors``); ""
      for none.
    partition: relative lengths of the stage windows in sampling order (``parse_partition``),
      None/"" = uniform.
    correlation: the in-block correlation of every jump's corrective noise (the papers' gamma);
      None = the smallest valid value -1/(m - 1) of each jump's m-element block.
    diffusion: ``"flow_matching"`` or ``"ddim"``.
    timesteps: what the model is conditioned on (`TIMESTEPS`): ``"noise_level"`` (the global
      time t), or ``"released"``: Pyramid Flow's released models' stage-unique ranges
      (``pfm.pyramid.windows.released_timestep_windows``, for their 3 stages with the default
      correlation -1/3).

  Raises:
    ValueError: if a jump changes neither size nor frame rate, a correlation is out of
      [-1/(m - 1), 0] for its block, the schedule / partition is malformed, or ``timesteps`` is
      unknown.
  """
  if timesteps not in TIMESTEPS:
    raise ValueError(f"timesteps={timesteps!r} is not one of {TIMESTEPS}")
  if num_stages < 1:
    raise ValueError(f"num_stages must be >= 1, got {num_stages}")
  noise_schedule = diffusions.get(diffusion).noise_schedule
  num_jumps = num_stages - 1
  temporal_jumps = parse_factors(frame_rate_schedule, num_jumps)[::-1]  # index: finer stage k
  spatial_jump = 2 if spatial else 1
  spatial_factors = tuple(spatial_jump**k for k in range(num_stages))
  temporal_factors = tuple(int(np.prod(temporal_jumps[:k])) for k in range(num_stages))
  correlations = []
  for k in range(num_jumps):
    m = renoise_lib.block_size(spatial_jump, temporal_jumps[k])
    if m < 2:
      raise ValueError(f"the jump into stage {k} changes neither resolution nor frame rate: a "
                       f"pyramid of {num_stages} stages needs spatial=True or a frame-rate "
                       "schedule")
    lower = renoise_lib.min_block_correlation(spatial_jump, temporal_jumps[k])
    g = lower if correlation is None else float(correlation)
    if not lower - 1e-9 <= g <= 0.0:
      raise ValueError(f"correlation={g} is outside [{lower:.4f}, 0] for the {m}-element blocks "
                       f"of the jump into stage {k}")
    correlations.append(g)
  boundaries = windows_lib.partition_boundaries(parse_partition(partition, num_stages))
  w = windows_lib.stage_windows(num_stages, boundaries, correlations[::-1], noise_schedule)
  return Pyramid(windows=tuple((float(s), float(e)) for s, e in w),
                 spatial_factors=spatial_factors, temporal_factors=temporal_factors,
                 correlations=tuple(correlations), diffusion=diffusion,
                 timestep_windows=(windows_lib.released_timestep_windows(
                     num_stages, gamma=-correlations[0] if correlations else 1 / 3)
                                   if timesteps == "released" else None))
