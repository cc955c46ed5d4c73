"""Models of pfm: the MM-DiT over packed token batches and its parts.

`build_model(config, rngs)` builds an `MMDiT` from an `MMDiTConfig`, a variant name
("smoke", "S", "B", "L", "2B") or a mapping of config fields.

Modules, lowest first (each imports only modules above it in this list):
  axes          logical axis names of parameters and activations, and the named layouts
  partitioning  logical names -> mesh axes: initializers with names, specs, constraints
  layers        linear / norm / MLP layers with logical names on every parameter
  masks         the attention mask from token metadata (`MaskInfo`, `make_attention_mask`)
  kernels       attention kernels (xla, dot_product, cudnn, splash) and their registry
  embeddings    sinusoidal position / noise-level embeddings and RoPE
  attention     attention projections (`QKV`, `attention_output`)
  text          the byte-level caption encoder and per-segment pooling
  overlap       the overlapping output head: 2p x 2p windows blended into patches
  presets       `MMDiTConfig` and the size presets `VARIANTS`
  blocks        `StreamBlock`, `JointBlock`, `FinalLayer`
  stacking      stacked blocks under `jax.lax.scan`, remat policies, checkpoint layouts
  mmdit         the `MMDiT` module, `build_model`, `count_params`
  vae           Pyramid Flow's causal video VAE (`CausalVideoVAE`, `VAEConfig`, `vae_config`)
  discriminator the VAE's PatchGAN discriminator and the LPIPS network
  text_encoders the frozen T5 v1.1 encoder and CLIP text towers, from Hugging Face folders
"""

from __future__ import annotations

from pfm.models.axes import LOGICAL_AXIS_NAMES
from pfm.models.kernels import ATTENTION_BACKENDS, check_backend, dot_product_attention
from pfm.models.masks import MaskInfo, make_attention_mask
from pfm.models.mmdit import MMDiT, build_model, count_params
from pfm.models.partitioning import logical_to_mesh_axes, with_logical_constraint
from pfm.models.presets import OUTPUT_HEADS, VARIANTS, MMDiTConfig, model_config
from pfm.models.stacking import REMAT_POLICY_NAMES
from pfm.models.vae import VAE_VARIANTS, CausalVideoVAE, VAEConfig, vae_config

__all__ = [
  "ATTENTION_BACKENDS",
  "CausalVideoVAE",
  "LOGICAL_AXIS_NAMES",
  "MMDiT",
  "MMDiTConfig",
  "MaskInfo",
  "OUTPUT_HEADS",
  "REMAT_POLICY_NAMES",
  "VAEConfig",
  "VAE_VARIANTS",
  "VARIANTS",
  "build_model",
  "check_backend",
  "count_params",
  "dot_product_attention",
  "logical_to_mesh_axes",
  "make_attention_mask",
  "model_config",
  "vae_config",
  "with_logical_constraint",
]
