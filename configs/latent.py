r"""Pyramidal flow matching in the latent space of a causal video VAE, sized for a 2-core CPU.

The default run's spatial pyramid and autoregressive temporal pyramid, on the latents of the tiny
VAE of ``configs/vae.py`` (4x spatial, 4x temporal, 8 channels): a 64x64 clip of 17 frames is 5
latent frames of 16x16x8, and a frame unit is a latent frame (the first, pixel frame 0 encoded
alone, is the image unit). Patch 2 gives 64 tokens per unit at full size, as the pixel run's
patch 8 does on 64x64 pixels, for a quarter of its units.

  python -m pfm.train_vae --config=configs/vae.py --workdir=runs/vae
  python -m pfm.extract --config=configs/latent.py --output=features/demo
  python -m pfm.train --config=configs/latent.py --workdir=runs/latent
  python -m pfm.sample --workdir=runs/latent --prompt="..."   # decodes through the VAE

``:smoke`` is the same chain at 32x32 with the smoke VAE (2x, 2x, 4 channels), for the tests:
``--config.latent.vae=/tmp/vae_smoke --config.data.features=/tmp/features_smoke``.
"""

from __future__ import annotations

import ml_collections

from configs import args
from configs import default

VARIANTS = ("smoke",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The latent run; ``arg`` is a comma-separated list of variants (``smoke``)."""
  smoke = "smoke" in args.parse_variants(arg, VARIANTS)
  c = default.get_config("smoke" if smoke else None)

  # Where the features are (pfm.extract --output) and the VAE that made them (pfm.train_vae).
  c.data.features = "/tmp/features_smoke" if smoke else "features/demo"
  c.latent = ml_collections.ConfigDict()
  c.latent.vae = "/tmp/vae_smoke" if smoke else "runs/vae"
  # The VAE's latent geometry (checked against the VAE and the features).
  c.latent.channels = 4 if smoke else 8
  c.latent.spatial_compression = 2 if smoke else 4
  c.latent.temporal_compression = 2 if smoke else 4
  c.latent.encode_window = 0   # latent frames per causal encode chunk; 0 = the whole clip
  c.latent.decode_window = 0   # ... per decode chunk when sampling (exact, for memory)

  # Captions: the byte encoder, trained with the DiT (no download). "t5" / "t5_clip" read the
  # frozen encoders' features that pfm.extract caches (configs/pyramid_flow_384p.py).
  c.text = ml_collections.ConfigDict()
  c.text.encoder = "byte"
  c.text.t5 = ""
  c.text.clip = ()
  c.text.clip_projection = True  # the towers' projected pooled state (SD3); False: FLUX's pooled
  c.text.max_length = 128
  c.model.text_embed_dim = 0
  c.model.pooled_embed_dim = 0

  # Frame units are latent frames: 5 of them are 17 pixel frames (1 + 4 * 4) at stride 2.
  c.data.num_frames = 3 if smoke else 5
  c.data.frame_stride = 1 if smoke else 2
  c.model.patch_size = 2
  c.sample.num_frames = 3 if smoke else 5

  # pfm.extract: a clip starts every clip_hop source frames of each video.
  c.extract = ml_collections.ConfigDict()
  c.extract.clip_hop = 8 if smoke else 4
  c.extract.batch_size = 2 if smoke else 4
  c.extract.records_per_shard = 2 if smoke else 64
  return c
