r"""Full-sequence video diffusion without a pyramid: the baseline the pyramids are measured against.

The whole clip is generated at once (bidirectional attention over all frames) at full resolution
and frame rate through one stage, as a vanilla video DiT. The other full-sequence configs build on
``full_sequence_config`` here:

  configs/tpdiff.py           frame-rate pyramid (TPDiff)
  configs/pyramid_fullseq.py  spatial pyramid, whole clip (Pyramidal Flow's pyramid, full sequence)
  configs/spatiotemporal.py   both: every stage halves resolution and frame rate

Each takes comma-separated arguments: ``ddim`` for the DDIM form (variance-preserving schedule,
epsilon target) instead of flow matching, ``smoke`` for a seconds-long run:

  python -m pfm.train --config=configs/vanilla.py --workdir=runs/vanilla
  python -m pfm.train --config=configs/tpdiff.py:ddim,smoke --workdir=/tmp/tpdiff_ddim
"""

from __future__ import annotations

import ml_collections

from configs import args
from configs import default

VARIANTS = ("ddim", "smoke")


def full_sequence_config(arg: str | None, *, num_stages: int, spatial: bool,
                         frame_rate_schedule: str,
                         partition: str = "") -> ml_collections.ConfigDict:
  """The full-sequence run: ``configs/default.py`` with whole clips and the given pyramid.

  Args:
    arg: the config argument: "", "ddim", "smoke" or "ddim,smoke".
    num_stages: K; 1 = no pyramid.
    spatial: halve the resolution per coarser stage.
    frame_rate_schedule: frame-rate reduction per jump, coarsest first ("" = none, "2", "4-2").
    partition: relative lengths of the stage windows, coarsest first ("" = uniform, "2-1-1").
  """
  variants = args.parse_variants(arg, VARIANTS)
  smoke = "smoke" in variants
  c = default.get_config("smoke" if smoke else None)
  c.mode = "full_sequence"

  # Clips of 8 frames at 32x32 with 4x4 patches: 512 tokens at full size, 64 per frame. Every
  # stage of every pyramid below tiles: 8x8 pixels and 2 frames at the coarsest.
  c.data.height = c.data.width = 32
  c.data.num_frames = 8
  c.data.frame_stride = 2
  c.data.max_tokens = 512        # one full-size clip per row; coarser clips pack several
  c.data.max_text_tokens = 384   # four captions per row
  c.model.patch_size = 4

  c.pyramid.num_stages = num_stages
  c.pyramid.spatial = spatial
  c.pyramid.frame_rate_schedule = frame_rate_schedule
  c.pyramid.partition = partition                    # TPDiff Table 2: 1-1-1, 2-1-1, 1-1-2
  c.pyramid.stage_weights = (1.0,) * num_stages      # Algorithm 2: a stage uniformly at random
  c.pyramid.diffusion = "ddim" if "ddim" in variants else "flow_matching"
  # The network predicts clean pixels; the loss is still on the stage target (velocity, or
  # eps_k for DDIM, Algorithm 2) computed from it. "velocity" / "epsilon" predict the target.
  c.model.prediction = "clean"
  c.pyramid.align_noise = num_stages > 1             # data-noise alignment (TPDiff Algorithm 1)
  c.pyramid.stage_consistent_rope = True             # TPDiff Eq. 14

  c.sample.num_frames = 8
  # 30 steps in all (TPDiff Table 3), split over the stages as the partition splits the time
  # axis (pfm.spec.resolve; a --config.pyramid.partition override moves the steps too), unless
  # steps_per_stage gives them.
  c.sample.total_steps = 30
  c.sample.steps_per_stage = ()
  c.sample.guidance_scale = 4.0

  if smoke:
    c.data.height = c.data.width = 16
    c.data.num_frames = 4
    c.data.max_tokens = 64
    c.data.max_text_tokens = 192
    c.sample.num_frames = 4
    c.sample.total_steps = 6  # split over the stages: also valid when num_stages is overridden
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Vanilla full-sequence diffusion: one stage at full resolution and frame rate."""
  return full_sequence_config(arg, num_stages=1, spatial=False, frame_rate_schedule="")
