r"""Pyramid Flow at the paper's 384p size, for a pod: 640x384 video, 121 frames (5 s at 24 fps).

The released causal VAE's geometry (8x spatial, 8x temporal, 16 latent channels: 121 frames are
16 latent frames of 48x80), patch 2 (960 tokens per latent frame at full size), the 2B MM-DiT (SD3
Medium's 24 joint blocks of width 1536) on T5-XXL token features and the pooled projections of
CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (768 + 1280 = 2048), three spatial stages and the
autoregressive temporal pyramid (Pyramidal Flow Sec. 4.1). bfloat16 compute with float32
parameters, stacked and scanned blocks, fsdp over every device.

  python -m pfm.train_vae --config=configs/vae.py --config.vae.variant=pyramid_flow ... \
      --workdir=gs://bucket/vae                     # or a converted released VAE workdir
  python -m pfm.extract --config=configs/pyramid_flow_384p.py \
      --config.data.manifest=gs://bucket/videos.jsonl --config.latent.vae=gs://bucket/vae \
      --config.text.t5=/models/t5-v1_1-xxl --config.text.clip=/models/clip-l,/models/clip-g \
      --output=gs://bucket/features/384p           # one process per host
  python -m pfm.train --config=configs/pyramid_flow_384p.py \
      --config.data.features=gs://bucket/features/384p --workdir=gs://bucket/runs/384p

Text encoder folders are Hugging Face folders with ``config.json``, ``*.safetensors`` and the
tokenizer's ``tokenizer.json`` in the same folder (the released Pyramid Flow folder keeps them in
``text_encoder_3`` / ``tokenizer_3`` (T5) and ``text_encoder`` / ``text_encoder_2`` (CLIP): copy
each tokenizer into its model's folder).
"""

from __future__ import annotations

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = default.get_config()
  c.data.features = ""          # the pfm.extract folder (required to train)
  c.data.manifest = ""          # the videos pfm.extract reads
  c.data.height, c.data.width = 384, 640
  c.data.num_frames = 16        # latent frames: 1 + 8 * 15 = 121 pixel frames
  c.data.frame_stride = 1
  c.data.max_tokens = 4096      # the worst case, the 16th unit at full size, has 2940 tokens
  c.data.max_text_tokens = 512  # up to four 128-token captions per packed row
  c.data.batch_size = 256       # packed rows per step, global
  c.data.num_workers = 8

  c.latent = ml_collections.ConfigDict()
  c.latent.vae = ""
  c.latent.channels = 16
  c.latent.spatial_compression = 8
  c.latent.temporal_compression = 8
  c.latent.encode_window = 8    # causal chunks of 8 latent frames: exact, bounded memory
  c.latent.decode_window = 2

  c.text = ml_collections.ConfigDict()
  c.text.encoder = "t5_clip"
  c.text.t5 = ""
  c.text.clip = ()
  c.text.clip_projection = True  # the towers' projected pooled state (SD3); False: FLUX's pooled
  c.text.max_length = 128

  c.extract = ml_collections.ConfigDict()
  c.extract.clip_hop = 121      # non-overlapping 121-frame clips
  c.extract.batch_size = 1
  c.extract.records_per_shard = 256

  c.model.variant = "2B"
  c.model.patch_size = 2
  c.model.text_embed_dim = 4096   # T5-XXL
  c.model.pooled_embed_dim = 2048  # CLIP-L (768) + CLIP-bigG (1280)
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.scan_layers = True
  c.model.remat_policy = "dots"
  c.model.attention = "xla"      # cudnn on NVIDIA GPUs, splash on TPUs
  c.model.output_head = "patch"  # the VAE decoder, not the patch grid, makes the pixels

  c.optimizer.learning_rate = 1e-4
  c.optimizer.warmup_steps = 1000
  c.optimizer.ema_decay = 0.9999
  c.train.num_steps = 100_000
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 1000
  c.train.sample_every_steps = 5000
  c.sample.num_frames = 16
  c.sample.guidance_scale = 7.0        # the official sampler's 384p defaults
  c.sample.video_guidance_scale = 5.0

  c.mesh.data = 1
  c.mesh.fsdp = -1
  return c
