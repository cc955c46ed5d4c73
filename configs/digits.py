r"""Moving Digits experiments: the papers' ablations at small scale (``docs/results.md``).

One-digit Moving Digits clips (``pfm.data.moving_digits``: real handwritten digits moving in one
of eight directions, captioned "the digit 7 moves down and to the left") of 8 frames at 32x32,
the XS MM-DiT, and download-free scores every ``train.sample_every_steps`` on 32 captions of the
test split (``pfm.evaluate``: prompt accuracy, identity consistency, direction accuracy, motion
smoothness, Fréchet distance in a digit classifier's features, SWD), logged as ``eval/...``
scalars next to the training compute (``compute/train_pflop``, ``compute/train_seconds``).

The base config is full-resolution full-sequence flow matching (one stage); each ablation is a
``sweep`` over the arms it compares, with seeds:

  python -m launch.sweep --config=configs/digits.py:fig7 --workdir=runs/digits/fig7
  python -m launch.sweep --config=configs/digits.py:table2 --workdir=runs/digits/table2
  python -m pfm.train --config=configs/digits.py --workdir=runs/digits/full     # one run
  python -m pfm.train --config=configs/digits.py:smoke --workdir=/tmp/digits    # seconds

Ablations (the ``ARG`` of ``--config=configs/digits.py:ARG``):

  fig7    spatial pyramid against full resolution (Pyramidal Flow Fig. 7), 2 seeds
  table2  TPDiff Table 2: stages, partition, reduction schedule, alignment (temporal pyramid)
  pfm     the spatiotemporal pyramid against TPDiff's temporal and the spatial pyramid alone,
          2 seeds
  coupling  coupled against independent endpoint noise (Pyramidal Flow Fig. 13), spatial pyramid
  fig8    compressed against full-resolution history, autoregressive mode (Fig. 8)
  fig11   blockwise causal against bidirectional attention, autoregressive mode (Fig. 11)

Renoising at the jump points (Fig. 10) is a sampling choice: the fig7 spatial checkpoints are
scored with and without it by ``pfm.evaluate --renoise=false`` (``docs/results.md``).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from configs import args
from configs import vanilla

ABLATIONS = ("fig7", "table2", "pfm", "coupling", "fig8", "fig11")
VARIANTS = ("smoke",) + ABLATIONS
SEEDS = (0, 1)

# The pyramid arms, as overrides of the base config (every pyramid field set, so that an arm
# means the same thing in any sweep).
FULL = {"pyramid.num_stages": 1, "pyramid.spatial": False, "pyramid.frame_rate_schedule": "",
        "pyramid.partition": "", "pyramid.align_noise": False, "pyramid.stage_weights": (1.0,),
        "pyramid.coupled_noise": True}
SPATIAL = {"pyramid.num_stages": 3, "pyramid.spatial": True, "pyramid.frame_rate_schedule": "",
           "pyramid.partition": "", "pyramid.align_noise": True,
           "pyramid.stage_weights": (1.0, 1.0, 1.0), "pyramid.coupled_noise": True}
TEMPORAL = {"pyramid.num_stages": 3, "pyramid.spatial": False, "pyramid.frame_rate_schedule": "2",
            "pyramid.partition": "", "pyramid.align_noise": True,
            "pyramid.stage_weights": (1.0, 1.0, 1.0), "pyramid.coupled_noise": True}
SPATIOTEMPORAL = {"pyramid.num_stages": 3, "pyramid.spatial": True,
                  "pyramid.frame_rate_schedule": "2", "pyramid.partition": "2-1-1",
                  "pyramid.align_noise": True, "pyramid.stage_weights": (1.0, 1.0, 1.0),
                  "pyramid.coupled_noise": True}
# The autoregressive mode (Pyramidal Flow Sec. 3.3): frame unit by frame unit, each with its
# history, on the spatial pyramid; a training sample is one unit, so rows of 384 tokens hold
# about as many samples as the text budget allows (~9 one-digit captions).
AUTOREGRESSIVE = SPATIAL | {"mode": "autoregressive", "data.max_tokens": 384,
                            "pyramid.compress_history": True, "model.blockwise_causal": True}


# Sampling-only ablations: per sweep, (run name, the trained run it samples, relative to the
# sweeps' folder, pfm.evaluate flags). Each run is one pfm.evaluate call writing
# SWEEP/RUN/metrics.json, e.g. for fig10 (renoising at the jump points, Pyramidal Flow Fig. 10):
#   python -m pfm.evaluate --workdir=runs/digits/fig7/spatial,seed=0 --norenoise \
#       --output=runs/digits/fig10/no_renoise,seed=0/metrics.json
EVALUATIONS = {
    "fig10": [(f"{arm},seed={seed}", f"fig7/spatial,seed={seed}", flags)
              for arm, flags in (("renoise", ["--renoise"]), ("no_renoise", ["--norenoise"]))
              for seed in SEEDS],
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The base config: full-resolution full-sequence flow matching on Moving Digits.

  ``arg``: ``smoke`` for a seconds-long run; an ablation name selects its ``sweep`` (the base
  config is the same).
  """
  smoke = "smoke" in args.parse_variants(arg, VARIANTS)
  c = vanilla.full_sequence_config("smoke" if smoke else None, num_stages=1, spatial=False,
                                   frame_rate_schedule="")
  c.data.dataset = "moving_digits"
  c.data.moving_digits.max_digits = 1     # one digit: read reliably (pfm.metrics.digits)
  c.data.moving_digits.num_clips = 4000   # more clips than a run sees: no memorisation
  c.data.frame_stride = 2                 # 8 frames span 15 rendered ones: 14 px of travel
  # 8x8 patches: 16 tokens a frame, 128 a clip, so a step of 4 rows x 512 tokens trains on 16
  # full-size clips. (4x4 patches, 4 clips a step, reached only chance prompt accuracy in
  # 1200 steps, with or without the pyramid.)
  c.model.patch_size = 8
  # The ablations of docs/results.md were measured with the DiT head: it stays so that their
  # commands reproduce them.
  c.model.output_head = "patch"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  c.train.num_steps = 1200
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 500
  c.train.sample_every_steps = 300        # the scores' points along training
  c.sample.num_videos = 32                # test captions scored at each of them
  if smoke:
    c.data.moving_digits.num_clips = 64
    c.optimizer.warmup_steps = 2
    c.train.num_steps = 6
    c.train.log_every_steps = 2
    c.train.checkpoint_every_steps = 6
    c.train.sample_every_steps = 6
    c.sample.num_videos = 2
  return c


def _seeded(arms: dict[str, dict[str, Any]], seeds=SEEDS) -> list[tuple[str, dict[str, Any]]]:
  """``(run name, overrides)`` per arm and seed: ``("spatial,seed=1", {..., "seed": 1})``."""
  return [(f"{name},seed={seed}", dict(overrides, seed=seed))
          for name, overrides in arms.items() for seed in seeds]


def sweep(arg: str | None = None) -> list[tuple[str, dict[str, Any]]]:
  """The runs of the ablation named in ``arg`` (one of `ABLATIONS`).

  Raises:
    ValueError: if ``arg`` names no ablation.
  """
  variants = args.parse_variants(arg, VARIANTS)
  chosen = [a for a in ABLATIONS if a in variants]
  if len(chosen) != 1:
    raise ValueError(f"--config=configs/digits.py:ABLATION with one of {ABLATIONS}, got {arg!r}")
  ablation = chosen[0]
  if ablation == "fig7":
    return _seeded({"full": FULL, "spatial": SPATIAL})
  if ablation == "coupling":  # Fig. 13: one noise for both endpoints, or one each
    return _seeded({"coupled": SPATIAL,
                    "independent": SPATIAL | {"pyramid.coupled_noise": False}}, seeds=(0,))
  if ablation == "fig8":  # compressed history (Eq. 16) against full resolution (Eq. 15)
    return _seeded({"compressed": AUTOREGRESSIVE,
                    "full_history": AUTOREGRESSIVE | {"pyramid.compress_history": False}})
  if ablation == "fig11":  # blockwise causal against bidirectional attention
    return _seeded({"causal": AUTOREGRESSIVE,
                    "bidirectional": AUTOREGRESSIVE | {"model.blockwise_causal": False}})
  if ablation == "table2":
    rows = {
        "temporal": TEMPORAL,  # 3 stages, partition 1-1-1, reduction 2 per jump, aligned
        "2_stages": TEMPORAL | {"pyramid.num_stages": 2, "pyramid.stage_weights": (1.0, 1.0)},
        "partition_2-1-1": TEMPORAL | {"pyramid.partition": "2-1-1"},
        "partition_1-1-2": TEMPORAL | {"pyramid.partition": "1-1-2"},
        "reduction_4-2": TEMPORAL | {"pyramid.frame_rate_schedule": "4-2"},
        "no_alignment": TEMPORAL | {"pyramid.align_noise": False},
    }
    # Two seeds where the difference is small: the reference row and alignment off.
    return (_seeded(rows, seeds=(0,))
            + _seeded({k: rows[k] for k in ("temporal", "no_alignment")}, seeds=(1,)))
  return _seeded({"spatiotemporal": SPATIOTEMPORAL, "temporal": TEMPORAL, "spatial": SPATIAL})
