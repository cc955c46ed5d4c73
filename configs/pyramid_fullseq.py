r"""The spatial pyramid of Pyramidal Flow Matching over whole clips (its Appendix D limitation).

Three stages at 1/4, 1/2 and full resolution, applied frame-wise to a clip that is generated at
once under bidirectional attention; 2x2 renoising (gamma = -1/3, Eq. 15). Flow matching, or the
DDIM form with ``:ddim``:

  python -m pfm.train --config=configs/pyramid_fullseq.py --workdir=runs/pyramid_fullseq
  python -m pfm.train --config=configs/pyramid_fullseq.py:ddim,smoke --workdir=/tmp/p
"""

from __future__ import annotations

from configs import vanilla


def get_config(arg: str | None = None):
  return vanilla.full_sequence_config(arg, num_stages=3, spatial=True, frame_rate_schedule="")
