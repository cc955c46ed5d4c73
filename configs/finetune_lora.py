r"""LoRA fine-tuning of a trained run on the default videos: its weights frozen, low-rank adapters
W + (alpha / r) A B trained on the attention projections (q, k, v, out) and the MLPs of every
joint block (pfm/lora.py).

The run to adapt is ``--config.train.init_from=WORKDIR`` (its newest intact checkpoint's EMA
parameters); its model, latent space, captions and pyramid are read from WORKDIR/config.json
(``train.inherit``, ``pfm.spec.INHERITED_FIELDS``), a pfm run's or a converted released
model's. The checkpoints hold the adapters only; the base weights are read from WORKDIR at the start and at
every resume (the same source checkpoint each time), so WORKDIR must stay readable. Sampling
merges the adapters into the base weights.

  python -m pfm.train --config=configs/default.py --workdir=runs/demo        # the run to adapt
  python -m pfm.train --config=configs/finetune_lora.py --workdir=runs/demo_lora \
      --config.train.init_from=runs/demo
  python -m pfm.sample --workdir=runs/demo_lora --prompt="a big fluffy grey cartoon rabbit ..."

  # the same in minutes
  python -m pfm.train --config=configs/default.py:smoke --workdir=/tmp/smoke
  python -m pfm.train --config=configs/finetune_lora.py:smoke --workdir=/tmp/smoke_lora \
      --config.train.init_from=/tmp/smoke

  # other targets: names of pfm.lora.TARGETS or module-path regexes
  ... --config.train.lora.targets="('attention', 'mlp', 'modulation')"
  ... --config.train.lora.targets='blocks/\d+/video/qkv/[qkv]'

A converted released model (``pfm.convert``) trains on cached latents and caption features of
your videos, made with its own VAE and text encoders:

  python -m pfm.extract --config=configs/finetune_lora.py --config.train.init_from=runs/miniflux768 \
      --config.data.manifest=videos.jsonl --output=runs/miniflux768/features
  python -m pfm.train --config=configs/finetune_lora.py --config.train.init_from=runs/miniflux768 \
      --workdir=runs/ft      # reads runs/miniflux768/features (its config's data.features)

Any other config adapts the same way: ``--config=configs/latent.py --config.train.init_from=...
--config.train.lora.rank=8``.
"""

from __future__ import annotations

import ml_collections

from configs import args
from configs import default

VARIANTS = ("smoke",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default run's config with LoRA; ``arg`` is a comma-separated list of variants
  (``smoke``: the smoke model, which ``configs/default.py:smoke`` trains)."""
  smoke = "smoke" in args.parse_variants(arg, VARIANTS)
  c = default.get_config("smoke" if smoke else None)

  # LoRA: rank-r adapters on the joint blocks' attention and MLP; every other weight is frozen.
  c.train.init_from = ""  # the workdir to adapt: set it on the command line
  # Its architecture, latent space, captions and pyramid come from its config.json
  # (pfm.spec.INHERITED_FIELDS), so a converted released model needs no other flag.
  c.train.inherit = True
  c.train.lora.rank = 8
  c.train.lora.alpha = 8.0  # scale alpha / r = 1
  c.train.lora.targets = ("attention", "mlp")

  # Optimizer: B starts at zero, so adapters take a larger learning rate than full training;
  # no weight decay on them (it would pull the update A B towards zero).
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 50
  c.optimizer.weight_decay = 0.0

  # Loop: a fine-tuning run is shorter than the run it adapts.
  c.train.num_steps = 1000
  c.train.checkpoint_every_steps = 250
  c.train.sample_every_steps = 500

  if smoke:
    c.train.lora.rank = 4
    c.optimizer.warmup_steps = 2
    c.train.num_steps = 12
    c.train.checkpoint_every_steps = 6
    c.train.sample_every_steps = 12
  return c
