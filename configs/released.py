r"""The released Pyramid Flow models as pfm runs: what ``pfm.convert`` writes into a workdir.

``arg`` is ``family,variant``: family ``pyramid_mmdit`` (the SD3-based 2B MM-DiT, folder
``pyramid-flow-sd3``) or ``pyramid_flux`` (miniFLUX, folder ``pyramid-flow-miniflux``); variant
``384p`` (640x384, up to 5 s), ``768p`` (1280x768, up to 10 s) or, for miniFLUX, ``image``
(text-to-image, 1024x1024). Everything the official pipeline fixes is set here to reproduce it:

* the released VAE's latent geometry (8x spatial, 8x temporal, 16 channels; a frame unit is a
  latent frame, the first one the image);
* T5-XXL token features (128 tokens) and the pooled CLIP embedding (SD3: CLIP-L + bigG
  projections, 2048; miniFLUX: CLIP-L's pooled state, 768);
* three spatial stages splitting the noise axis evenly (``pyramid.partition = "333-333-334"``:
  the official ``stage_range`` cut at whole timesteps), corrective noise of in-block correlation
  -1/3, the compressed history, and the model conditioned on the official stage-unique timestep
  ranges (``pyramid.timesteps = "released"``);
* the official Euler grid (N - 1 even steps, then a last step of 0.001; ``sample.time_grid``),
  prompt suffix and negative prompt, guidance scales and steps per stage.

The model's sizes and options (``model.architecture``) are the released ones (``OFFICIAL_DITS``,
through ``pfm.convert.dit_config_from_official``), so the config alone is the full-size model with
random weights; ``pfm.convert`` sets them from the converted folder's ``config.json`` and fills in
the paths of the converted VAE and text encoders:

  python -m pfm.convert --source=/path/to/pyramid-flow-miniflux --variant=768p \
      --output=runs/miniflux768
"""

from __future__ import annotations

import ml_collections

from configs import args
from configs import pyramid_flow_384p

FAMILIES = ("pyramid_mmdit", "pyramid_flux")
VARIANTS = ("384p", "768p", "image")
# (height, width) of each variant; the official pipeline's sizes.
SIZES = {"384p": (384, 640), "768p": (768, 1280), "image": (1024, 1024)}
# The official pipeline's prompt suffix (`generate`: "to improve aesthetics") and default
# negative prompt.
PROMPT_SUFFIX = ", hyper quality, Ultra HD, 8K"
NEGATIVE_PROMPT = ("cartoon style, worst quality, low quality, blurry, absolute black, absolute "
                   "white, low res, extra limbs, extra digits, misplaced objects, mutated "
                   "anatomy, monochrome, horror")


# The released DiTs' sizes (their config.json, as diffusers writes it): the SD3-based 2B MM-DiT
# (SD3 Medium's 24 joint blocks, 24 heads of 64) and miniFLUX (30 heads of 64 = width 1920, 8
# joint and 16 single-stream blocks). They make this config the full-size model with random
# weights (e.g. for `pfm.benchmark --benchmark=sampling_memory`); pfm.convert replaces them with
# the converted folder's.
OFFICIAL_DITS = {
    "pyramid_mmdit": dict(
        _class_name="PyramidDiffusionMMDiT", sample_size=128, patch_size=2, in_channels=16,
        num_layers=24, attention_head_dim=64, num_attention_heads=24,
        caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192,
        joint_attention_dim=4096, qk_norm="rms_norm", pos_embed_type="sincos"),
    "pyramid_flux": dict(
        _class_name="PyramidFluxTransformer", patch_size=1, in_channels=64, num_layers=8,
        num_single_layers=16, attention_head_dim=64, num_attention_heads=30,
        joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=[16, 24, 24]),
}
# MMDiTConfig fields that other config fields set (latent channels, caption widths, ...).
NOT_ARCHITECTURE = ("channels", "text_embed_dim", "pooled_embed_dim", "text_depth", "patch_size",
                    "output_head", "text_time_conditioning")


def architecture(fields: dict) -> dict:
  """``config.model.architecture`` from `pfm.convert.dit_config_from_official` fields (empty
  sequences, the default, left out: ml_collections refuses to freeze two empty tuples)."""
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in fields.items()
          if k not in NOT_ARCHITECTURE and v != ()}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The released ``family,variant`` (default ``pyramid_flux,384p``).

  Raises:
    ValueError: for an unknown family or variant, or the image variant of the MM-DiT family.
  """
  chosen = args.parse_variants(arg, FAMILIES + VARIANTS) if arg else ()
  family = next((a for a in chosen if a in FAMILIES), "pyramid_flux")
  variant = next((a for a in chosen if a in VARIANTS), "384p")
  if family == "pyramid_mmdit" and variant == "image":
    raise ValueError("the SD3-based release has no image model (variants 384p, 768p)")
  c = pyramid_flow_384p.get_config()
  c.released = ml_collections.ConfigDict({"family": family, "variant": variant})
  c.data.height, c.data.width = SIZES[variant]
  c.data.num_frames = 1 if variant == "image" else 16  # latent frames: 16 -> 121 pixel frames
  c.data.max_tokens = 8192 if variant == "768p" else 4096
  c.data.features = "features"  # pfm.convert: OUTPUT/features, where pfm.extract writes

  # Captions: T5-XXL features and the pooled CLIP embedding (paths set by pfm.convert).
  c.text.encoder = "t5_clip"
  c.text.max_length = 128
  c.model.text_embed_dim = 4096
  c.model.pooled_embed_dim = 2048 if family == "pyramid_mmdit" else 768
  from pfm import convert  # the released config.json -> pfm's model fields
  c.model.architecture = architecture(convert.dit_config_from_official(OFFICIAL_DITS[family]))
  c.text.clip_projection = family == "pyramid_mmdit"  # miniFLUX: CLIP-L's pooled state
  c.text.null_caption = "encoded"  # the empty caption's T5 and CLIP features, as the pipeline's

  # Blocks stacked and scanned (pfm.convert stacks the converted ones): sampling the 384p 2B
  # MM-DiT needs 4.2 GiB of temporaries instead of 13.1 unrolled (pfm.benchmark sampling_memory).
  c.model.scan_layers = True
  c.model.prediction = "velocity"     # the released models predict the stage's velocity
  c.model.text_time_conditioning = True
  c.model.caption_dropout = 0.1
  c.model.output_head = "patch"

  c.pyramid.num_stages = 3
  c.pyramid.spatial = True
  c.pyramid.partition = "333-333-334"
  c.pyramid.correlation = -1.0 / 3.0
  c.pyramid.compress_history = True
  c.pyramid.timesteps = "released"

  c.sample.num_frames = c.data.num_frames
  c.sample.first_frame_steps = (20, 20, 20)   # the official defaults (num_inference_steps)
  c.sample.later_frame_steps = (10, 10, 10)   # video_num_inference_steps
  c.sample.guidance_scale = 7.0 if variant != "768p" else 9.0
  c.sample.video_guidance_scale = 5.0
  c.sample.time_grid = "released"
  c.sample.prompt_suffix = PROMPT_SUFFIX
  c.sample.negative_prompt = NEGATIVE_PROMPT
  return c
