r"""Training the causal video VAE (`pfm.models.vae`) on the default videos, sized for a 2-core CPU.

The "tiny" VAE (4x spatial, 4x temporal, 8 latent channels) on 64x64 clips of 9 frames with
single frames mixed in, L1 + KL; the last 20% of every video is held out and scores PSNR/SSIM.

  python -m pfm.train_vae --config=configs/vae.py --workdir=runs/vae
  python -m pfm.train_vae --config=configs/vae.py:smoke --workdir=/tmp/vae_smoke   # seconds
  python -m pfm.train_vae --config=configs/vae.py --config.vae.variant=pyramid_flow \
      --config.data.height=256 --config.data.width=256 --config.data.num_frames=17 ...  # a pod

Any field of `pfm.models.vae.VAEConfig` can be overridden under ``vae`` (the variant's preset
fills the rest). The official recipe's adversarial and perceptual terms are here but off: set
``loss.disc_weight=0.5`` and ``loss.disc_start`` for the PatchGAN, ``loss.perceptual_weight=1``
with ``loss.perceptual_weights=PATH`` (converted LPIPS VGG weights) for LPIPS.
"""

from __future__ import annotations

import ml_collections

from configs import args

VARIANTS = ("smoke",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  smoke = "smoke" in args.parse_variants(arg, VARIANTS)
  c = ml_collections.ConfigDict()
  c.seed = 0

  # The VAE: a preset of `pfm.models.vae.VAE_VARIANTS` and overrides of its fields.
  c.vae = ml_collections.ConfigDict()
  c.vae.variant = "smoke" if smoke else "tiny"
  c.vae.logvar_init = -6.0   # a small posterior variance from the start (KL weight 1e-6)

  # Clips (pfm.data.clips.ClipSettings).
  c.data = ml_collections.ConfigDict()
  c.data.manifest = ""
  c.data.height = 32 if smoke else 64
  c.data.width = 32 if smoke else 64
  c.data.num_frames = 5 if smoke else 9     # 1 + f_t * k for the VAE's temporal factor f_t
  c.data.frame_stride = 1
  c.data.batch_size = 2                     # video clips per step
  c.data.image_batch_size = 2               # single frames per step (0: videos only)
  c.data.holdout_fraction = 0.2             # the tail of every video: held-out evaluation clips
  c.data.num_threads = 2

  # L_G = w_pix rec + w_lpips LPIPS + w_kl KL + lambda f(step) G (pfm.vae_objective).
  c.loss = ml_collections.ConfigDict()
  c.loss.reconstruction = "l1"
  c.loss.pixel_weight = 1.0
  c.loss.kl_weight = 1e-6
  c.loss.image_weight = 1.0          # weight of the single-frame batch's loss
  c.loss.perceptual_weight = 0.0
  c.loss.perceptual_weights = ""     # converted LPIPS (VGG) weights: .npz / .safetensors
  c.loss.disc_weight = 0.0           # 0: no discriminator (official: 0.5)
  c.loss.disc_start = 0              # first adversarial step (official: 250000)
  c.loss.disc_channels = 64
  c.loss.disc_layers = 3

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 6 if smoke else 1100
  c.train.learning_rate = 1e-3
  c.train.disc_learning_rate = 1e-4
  c.train.warmup_steps = 2 if smoke else 100
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.weight_decay = 1e-3
  c.train.grad_clip = 1.0
  c.train.log_every_steps = 2 if smoke else 50
  c.train.eval_every_steps = 3 if smoke else 500
  c.train.checkpoint_every_steps = 3 if smoke else 500
  c.train.max_checkpoints = 2

  c.eval = ml_collections.ConfigDict()
  c.eval.clips_per_video = 2         # held-out clips per video for PSNR / SSIM
  c.eval.videos_written = 3          # reconstruction strips and mp4s per evaluation
  # Training batches whose latents set the VAE's normalisation constants at the end of training
  # (vae.json: shift and scale of the first and of the later latent frames); 0 keeps the config's
  # (the released VAE's) constants.
  c.eval.latent_statistics_batches = 2 if smoke else 16

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.sequence = 1
  c.mesh.tensor = 1
  return c
