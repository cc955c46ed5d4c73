r"""A spatiotemporal pyramid: every coarser stage halves both resolution and frame rate.

Beyond both papers (TPDiff's Appendix A.7 leaves joint spatial and temporal redundancy open): a
coarse value fills a 2x2x2 space-time block at each jump, renoised with the one rule of
``pfm.pyramid.renoise`` at its smallest correlation gamma = -1/7. Flow matching, or DDIM with
``:ddim``.

Its coarse stages cost 1/8 and 1/64 of the full-size one per step, so it spends half of the
trajectory in the coarsest stage (partition 2-1-1, TPDiff Table 2; 16/7/7 of 30 steps):

  python -m pfm.train --config=configs/spatiotemporal.py --workdir=runs/spatiotemporal
  python -m pfm.train --config=configs/spatiotemporal.py:ddim,smoke --workdir=/tmp/st
"""

from __future__ import annotations

from configs import vanilla


def get_config(arg: str | None = None):
  return vanilla.full_sequence_config(arg, num_stages=3, spatial=True, frame_rate_schedule="2",
                                      partition="2-1-1")
