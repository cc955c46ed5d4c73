r"""TPDiff: a frame-rate pyramid over whole clips (Ran & Shou, Sec. 3).

Three stages at 1/4, 1/2 and full frame rate (reduction 2 per stage, partition 1-1-1: the paper's
best row of Table 2), stage-wise flow matching (Eqs. 12-13) or DDIM (``:ddim``, Eqs. 10-11), data-
noise alignment (Algorithm 1), stage-consistent RoPE (Eq. 14) and renoising of duplicated frame
pairs (gamma = -1, Eq. 15). Ablations are one flag away:

  python -m pfm.train --config=configs/tpdiff.py --workdir=runs/tpdiff
  python -m pfm.train --config=configs/tpdiff.py:ddim --workdir=runs/tpdiff_ddim
  python -m pfm.train --config=configs/tpdiff.py --config.pyramid.frame_rate_schedule=4-2 \
      --config.pyramid.partition=2-1-1 --config.pyramid.align_noise=False --workdir=...
"""

from __future__ import annotations

from configs import vanilla


def get_config(arg: str | None = None):
  return vanilla.full_sequence_config(arg, num_stages=3, spatial=False, frame_rate_schedule="2")
