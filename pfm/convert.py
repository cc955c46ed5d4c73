"""Converting the released Pyramid Flow weights into pfm: mapping tables from the official keys.

Each model family is a table of rules from an official tensor name (the PyTorch ``state_dict``
key, as saved in the released safetensors) to a pfm parameter path and the transform between
their layouts; a loader applies them and refuses a tensor it has no rule for, or a parameter no
tensor filled, naming it (``CheckpointLayoutError``).

The causal video VAE (the released ``causal_video_vae`` folder: diffusers' ``config.json`` +
``diffusion_pytorch_model.safetensors``, module ``video_vae.CausalVideoVAE``):

* 3-D convolutions ``<m>.conv.weight`` [O, I, kT, kH, kW] -> ``<m>/conv/kernel`` [kT, kH, kW, I, O];
* GroupNorms ``<norm>.weight`` / ``.bias`` -> ``<norm>/norm/scale`` / ``bias``;
* attention projections ``to_q`` ... ``to_out.0`` [O, I] -> ``to_q`` ... ``to_out`` kernels [I, O];
* the samplers ``downsamplers.0.conv`` / ``upsamplers.0.conv`` -> ``spatial``, the
  ``temporal_downsamplers.0.conv`` / ``temporal_upsamplers.0.conv`` -> ``temporal``;
* ``quant_conv`` / ``post_quant_conv`` -> ``encoder/quant_conv`` / ``decoder/post_quant_conv``.

The two DiT families (``diffusion_transformer_<variant>`` folders; ``dit_parameters``), the SD3-based
``PyramidDiffusionMMDiT`` and miniFLUX's ``PyramidFluxTransformer``, become pfm `MMDiT`s with the
options that reproduce them (``dit_config_from_official``): Linear weights transposed, per-head
projections reshaped with the RoPE pairing reordered, modulation chunks in diffusers' order
(AdaLayerNormContinuous's (scale, shift) swapped), the output layer negated (pfm predicts the
velocity towards data).

The tests check the converted modules against the official ones' outputs on tiny random
checkpoints (``tools/make_official_fixtures.py``).

``python -m pfm.convert --source=/path/to/pyramid-flow-miniflux --variant=768p
--output=runs/miniflux768`` converts a released folder into a pfm workdir (``convert_released``:
config, the DiT's checkpoint, the VAE workdir and the text encoders), which ``pfm.sample``,
``pfm.app`` and ``pfm.train --config.train.init_from`` open. Without ``--variant`` only the VAE
is converted, into ``OUTPUT/vae`` with ``--family``'s latent normalisation.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
from typing import Any

from absl import app, flags
import jax
import numpy as np
from flax import nnx
from flax import traverse_util

from configs import released
from pfm import checkpointing
from pfm import errors
from pfm import latent
from pfm import models
from pfm import spec as spec_lib
from pfm import state as state_lib
from pfm.models import stacking
from pfm.models import text_encoders as te
from pfm.models import vae as vae_lib

FLAGS = flags.FLAGS

# The latent normalisation of each released family (the official pipeline's constants): the
# first latent frame's shift and scale; later frames share -0.2343 and 1 / 3.0986.
FAMILIES = {
    "pyramid_mmdit": dict(image_shift=0.1490, image_scale=1 / 1.8415),  # SD3-based
    "pyramid_flux": dict(image_shift=-0.04, image_scale=1 / 1.8726),    # miniFLUX
}
VIDEO_NORMALIZATION = dict(video_shift=-0.2343, video_scale=1 / 3.0986)

CheckpointLayoutError = te.CheckpointLayoutError

_GROUP_NORMS = ("norm1", "norm2", "conv_norm_out", "group_norm")
_LINEARS = ("to_q", "to_k", "to_v", "to_out")
_VAE_RENAMES = (
    (r"^quant_conv\.", "encoder.quant_conv."),
    (r"^post_quant_conv\.", "decoder.post_quant_conv."),
    (r"\.temporal_(down|up)samplers\.0\.conv\.", ".temporal."),
    (r"\.(down|up)samplers\.0\.conv\.", ".spatial."),
    (r"\.attentions\.0\.", ".attention."),
    (r"\.to_out\.0\.", ".to_out."),
)


def vae_config_from_official(config: dict[str, Any], **overrides) -> vae_lib.VAEConfig:
  """The `VAEConfig` of a released VAE's ``config.json`` (its normalisation constants are the
  DiT pipeline's, not the VAE's: the defaults, or ``overrides``).

  Raises:
    ValueError: for a configuration pfm's VAE does not have (other block types, activations,
      different encoder and decoder GroupNorm groups, no post-quant convolution).
  """
  for key, allowed in (("encoder_act_fn", "silu"), ("decoder_act_fn", "silu"),
                       ("add_post_quant_conv", True), ("encoder_double_z", True)):
    if config.get(key, allowed) != allowed:
      raise ValueError(f"official VAE config {key}={config[key]!r}: pfm's VAE has {allowed!r}")
  for key, allowed in (("encoder_down_block_types", "DownEncoderBlockCausal3D"),
                       ("decoder_up_block_types", "UpDecoderBlockCausal3D")):
    if any(t != allowed for t in config.get(key, ())):
      raise ValueError(f"official VAE config {key}={config[key]}: pfm's VAE has {allowed}")
  if config["encoder_norm_num_groups"] != config["decoder_norm_num_groups"]:
    raise ValueError("official VAE config: encoder and decoder GroupNorm groups differ")
  fields = dict(
      in_channels=config["encoder_in_channels"], latent_channels=config["encoder_out_channels"],
      encoder_channels=tuple(config["encoder_block_out_channels"]),
      encoder_layers=tuple(config["encoder_layers_per_block"]),
      spatial_down=tuple(config["encoder_spatial_down_sample"]),
      temporal_down=tuple(config["encoder_temporal_down_sample"]),
      decoder_channels=tuple(config["decoder_block_out_channels"]),
      decoder_layers=tuple(config["decoder_layers_per_block"]),
      spatial_up=tuple(config["decoder_spatial_up_sample"]),
      temporal_up=tuple(config["decoder_temporal_up_sample"]),
      norm_groups=config["encoder_norm_num_groups"])
  config = vae_lib.VAEConfig(**(fields | overrides))
  config.validate()
  return config


def vae_parameter_path(key: str) -> tuple[tuple[str | int, ...], str]:
  """pfm's parameter path of an official VAE tensor name and its transform: ``"conv"`` (a 3-D
  convolution kernel), ``"linear"`` (a dense kernel) or ``""`` (as it is)."""
  name = key
  for pattern, replacement in _VAE_RENAMES:
    name = re.sub(pattern, replacement, name)
  *module, leaf = name.split(".")
  transform = ""
  if module and module[-1] in _GROUP_NORMS:
    module.append("norm")
    leaf = "scale" if leaf == "weight" else leaf
  elif module and module[-1] == "conv" and leaf == "weight":
    leaf, transform = "kernel", "conv"
  elif module and module[-1] in _LINEARS and leaf == "weight":
    leaf, transform = "kernel", "linear"
  path = tuple(int(p) if p.isdigit() else p for p in (*module, leaf))
  return path, transform


def _transform(value: np.ndarray, transform: str) -> np.ndarray:
  if transform == "conv":
    return np.transpose(value, (2, 3, 4, 1, 0))
  if transform == "linear":
    return value.T
  return value


def load_state(model: nnx.Module, tensors: dict[str, np.ndarray], rule) -> None:
  """Assigns every tensor to the parameter ``rule(name)`` names, transformed.

  Raises:
    CheckpointLayoutError: naming a tensor without a parameter, a parameter no tensor filled, or
      a shape that does not match.
  """
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  filled = set()
  for name, value in tensors.items():
    path, transform = rule(name)
    if path not in params:
      raise CheckpointLayoutError(f"unexpected tensor {name!r} (no pfm parameter "
                                  f"{'/'.join(map(str, path))})")
    value = _transform(np.asarray(value, np.float32), transform)
    variable = params[path]
    if value.shape != variable.shape:
      raise CheckpointLayoutError(f"tensor {name!r} has shape {value.shape} after conversion; "
                                  f"{'/'.join(map(str, path))} has {variable.shape}")
    variable.set_value(np.asarray(value, variable.dtype))
    filled.add(path)
  missing = [p for p in params if p not in filled]
  if missing:
    raise CheckpointLayoutError(f"missing tensor for {'/'.join(map(str, missing[0]))} "
                                f"({len(missing)} parameters unfilled)")


def load_official_vae(folder: str, **overrides) -> vae_lib.CausalVideoVAE:
  """The released causal video VAE of ``folder`` (``config.json`` + ``*.safetensors``) as a
  pfm `CausalVideoVAE`.

  Raises:
    FileNotFoundError: if the folder lacks its config or weights.
    CheckpointLayoutError: see `load_state`. ValueError: see `vae_config_from_official`.
  """
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{folder}: no config.json (the released causal_video_vae folder)")
  with open(path) as f:
    config = vae_config_from_official(json.load(f), **overrides)
  model = vae_lib.CausalVideoVAE(config, rngs=nnx.Rngs(0))
  load_state(model, te.read_safetensors(folder), vae_parameter_path)
  return model


def convert_vae(source: str, output: str, family: str = "pyramid_mmdit") -> str:
  """Converts the released VAE of ``source`` (the model folder, or its ``causal_video_vae``
  folder) into the VAE workdir ``output`` with ``family``'s latent normalisation; returns it.

  Raises:
    pfm.errors.UserError: for an unknown family or a folder without the VAE.
    CheckpointLayoutError: see `load_state`.
  """
  if family not in FAMILIES:
    raise errors.UserError(f"--family={family!r} is not one of {sorted(FAMILIES)}")
  folder = os.path.join(source, "causal_video_vae")
  if not os.path.isdir(folder):
    folder = source
  if not os.path.exists(os.path.join(folder, "config.json")):
    raise errors.UserError(f"--source={source}: no causal_video_vae/config.json (the released "
                           "Pyramid Flow folder is expected)")
  model = load_official_vae(folder, **FAMILIES[family], **VIDEO_NORMALIZATION)
  latent.save_vae(output, model)
  return output


# -- the DiT families ----------------------------------------------------------------------------
# `_class_name` of the released DiT folders (diffusers' config.json) -> pfm family name.
DIT_CLASSES = {"PyramidDiffusionMMDiT": "pyramid_mmdit", "PyramidFluxTransformer": "pyramid_flux"}


def dit_config_from_official(config: dict[str, Any], **overrides) -> dict[str, Any]:
  """`MMDiTConfig` fields reproducing a released DiT (its ``config.json``) as the released
  pipeline builds it.

  The pipeline (``build_pyramid_dit``) overrides the folder's config with temporal causal
  attention, interpolated history positions and, for the SD3 family, the temporal RoPE and the
  T5 mask; the fields follow the pipeline. Both families: one conditioning per sample
  (``conditioning="sample"``), the noise-counting timestep (``time_input="noise"``), captions in
  the oldest unit's causal block (``text_causal_block=0``), T5 features through one Linear
  (``text_projection_only``), RMS QK-normalisation. The SD3 family adds its cropped,
  interpolated sinusoid table (``position_embedding="table"``) and a temporal RoPE over the
  whole head; miniFLUX has single-stream blocks, a (frame, row, col) RoPE and no additive
  position.

  Raises:
    ValueError: for another class or an option pfm's model does not have.
  """
  name = config.get("_class_name")
  if name not in DIT_CLASSES:
    raise ValueError(f"official DiT config _class_name={name!r} is not one of {sorted(DIT_CLASSES)}")
  heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
  width = heads * head_dim
  common = dict(
      width=width, depth=int(config["num_layers"]), num_heads=heads, mlp_ratio=4.0,
      text_depth=0, text_width=width, text_embed_dim=int(config["joint_attention_dim"]),
      pooled_embed_dim=int(config["pooled_projection_dim"]), text_projection_only=True,
      time_frequency_dim=256, time_scale=1000.0, time_input="noise", conditioning="sample",
      text_causal_block=0, text_time_conditioning=True, rope_theta=10_000.0,
      norm_epsilon=1e-6, output_head="patch")
  if DIT_CLASSES[name] == "pyramid_mmdit":
    for key, allowed in (("pos_embed_type", "sincos"), ("qk_norm", "rms_norm")):
      if config.get(key, allowed) != allowed:
        raise ValueError(f"official DiT config {key}={config[key]!r}: pfm converts {allowed!r}")
    if int(config["caption_projection_dim"]) != width:
      raise ValueError(f"official DiT config caption_projection_dim="
                       f"{config['caption_projection_dim']} differs from the width {width}")
    patch = int(config["patch_size"])
    fields = dict(
        common, patch_size=patch, channels=int(config["in_channels"]), single_blocks=0,
        qk_norm_epsilon=1e-5, position_embedding="table",
        position_table_size=int(config["pos_embed_max_size"]),
        position_table_base=int(config["sample_size"]) // patch, rope_axes=())
  else:
    axes = tuple(int(d) for d in config.get("axes_dims_rope", (16, 24, 24)))
    # miniFLUX patchifies 2x2 itself: its in_channels counts a patch's features.
    fields = dict(
        common, patch_size=2, channels=int(config["in_channels"]) // 4,
        single_blocks=int(config["num_single_layers"]), qk_norm_epsilon=1e-6,
        position_embedding="none", rope_axes=axes)
  return fields | overrides


def _rope_order(head_dim: int) -> np.ndarray:
  """pfm's head features from the official ones: the official RoPE rotates adjacent pairs
  (2i, 2i + 1), pfm's rotate-half pairs (i, i + Dh / 2); attention logits are unchanged when
  queries and keys (and their norms' scales) are permuted alike."""
  return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


def _swap_halves(w: np.ndarray) -> np.ndarray:
  """(scale, shift) -> (shift, scale) along axis 0 (diffusers' AdaLayerNormContinuous)."""
  scale, shift = np.split(w, 2, axis=0)
  return np.concatenate([shift, scale], axis=0)


def dit_parameters(tensors: dict[str, np.ndarray], fields: dict[str, Any]
                   ) -> dict[tuple[str | int, ...], tuple[str, np.ndarray]]:
  """pfm parameter path -> (official tensor name, value in pfm's layout) of a released DiT.

  Layouts: Linear weights [out, in] -> kernels [in, out]; the per-head projections
  [H * Dh, D] -> [D, H, Dh] (queries and keys, their biases and QK-norm scales with the head
  features in `_rope_order`); the output projection [D, H * Dh] -> [H, Dh, D]; modulations
  [n * D, D] -> [D, n, D] in diffusers' chunk order (shift, scale, gate, ...), except
  AdaLayerNormContinuous's (scale, shift), which is swapped; the SD3 patch convolution
  [D, C, p, p] -> [p * p * C, D] in pfm's (row, col, channel) patch order; miniFLUX's
  single-block output Linear over [attention; MLP hidden] split into its two column blocks. The
  final layer is negated: the released models predict the velocity towards noise, pfm the
  velocity towards data.

  Raises:
    CheckpointLayoutError: naming a tensor no rule maps.
  """
  width, heads = fields["width"], fields["num_heads"]
  head_dim = width // heads
  order = _rope_order(head_dim)
  out: dict[tuple[str | int, ...], tuple[str, np.ndarray]] = {}

  def put(path, name, value):
    out[tuple(path)] = (name, np.asarray(value, np.float32))

  def linear(path, prefix, weight_fn=lambda w: w.T, bias_fn=lambda b: b):
    put((*path, "kernel"), prefix + ".weight", weight_fn(tensors[prefix + ".weight"]))
    if prefix + ".bias" in tensors:
      put((*path, "bias"), prefix + ".bias", bias_fn(tensors[prefix + ".bias"]))

  def heads_in(path, prefix, permute):
    idx = order if permute else np.arange(head_dim)
    linear(path, prefix, lambda w: w.T.reshape(width, heads, head_dim)[..., idx],
           lambda b: b.reshape(heads, head_dim)[..., idx])

  def heads_out(path, prefix):
    linear(path, prefix, lambda w: w.T.reshape(heads, head_dim, width))

  def modulation(path, prefix, n, swap=False):
    fix = _swap_halves if swap else (lambda w: w)
    linear(path, prefix, lambda w: fix(w).T.reshape(width, n, width),
           lambda b: fix(b).reshape(n, width))

  def qkv(path, prefix, q, k, v, q_norm, k_norm):
    heads_in((*path, "q"), f"{prefix}.{q}", True)
    heads_in((*path, "k"), f"{prefix}.{k}", True)
    heads_in((*path, "v"), f"{prefix}.{v}", False)
    put((*path, "q_norm", "scale"), f"{prefix}.{q_norm}.weight",
        tensors[f"{prefix}.{q_norm}.weight"][order])
    put((*path, "k_norm", "scale"), f"{prefix}.{k_norm}.weight",
        tensors[f"{prefix}.{k_norm}.weight"][order])

  def mlp(path, prefix):
    linear((*path, "fc1"), f"{prefix}.net.0.proj")
    linear((*path, "fc2"), f"{prefix}.net.2")

  if "pos_embed.proj.weight" in tensors:  # SD3: Conv2d(C, D, p, stride p)
    linear(("patch_embed",), "pos_embed.proj", lambda w: np.transpose(w, (2, 3, 1, 0)).reshape(
        -1, w.shape[0]))
  else:
    linear(("patch_embed",), "x_embedder")
  linear(("time_embed", "mlp", "fc1"), "time_text_embed.timestep_embedder.linear_1")
  linear(("time_embed", "mlp", "fc2"), "time_text_embed.timestep_embedder.linear_2")
  linear(("pooled_text_embed", "fc1"), "time_text_embed.text_embedder.linear_1")
  linear(("pooled_text_embed", "fc2"), "time_text_embed.text_embedder.linear_2")
  linear(("text_projection",), "context_embedder")
  text_norm = "norm_add" if fields["single_blocks"] == 0 else "norm_added"
  for i in range(fields["depth"]):
    src, dst = f"transformer_blocks.{i}", ("blocks", i)
    text_pre_only = fields["single_blocks"] == 0 and i == fields["depth"] - 1
    modulation((*dst, "video", "modulation"), f"{src}.norm1.linear", 6)
    modulation((*dst, "text", "modulation"), f"{src}.norm1_context.linear",
               2 if text_pre_only else 6, swap=text_pre_only)
    qkv((*dst, "video", "qkv"), f"{src}.attn", "to_q", "to_k", "to_v", "norm_q", "norm_k")
    qkv((*dst, "text", "qkv"), f"{src}.attn", "add_q_proj", "add_k_proj", "add_v_proj",
        f"{text_norm}_q", f"{text_norm}_k")
    heads_out((*dst, "video", "out"), f"{src}.attn.to_out.0")
    mlp((*dst, "video", "mlp"), f"{src}.ff")
    if not text_pre_only:
      heads_out((*dst, "text", "out"), f"{src}.attn.to_add_out")
      mlp((*dst, "text", "mlp"), f"{src}.ff_context")
  for i in range(fields["single_blocks"]):
    src, dst = f"single_transformer_blocks.{i}", ("single_blocks", i)
    modulation((*dst, "modulation"), f"{src}.norm.linear", 3)
    qkv((*dst, "qkv"), f"{src}.attn", "to_q", "to_k", "to_v", "norm_q", "norm_k")
    linear((*dst, "mlp", "fc1"), f"{src}.proj_mlp")
    w = tensors[f"{src}.proj_out.weight"]  # [D, D + hidden] over [attention; MLP hidden]
    put((*dst, "attention_out", "kernel"), f"{src}.proj_out.weight",
        w[:, :width].T.reshape(heads, head_dim, width))
    put((*dst, "mlp", "fc2", "kernel"), f"{src}.proj_out.weight", w[:, width:].T)
    put((*dst, "mlp", "fc2", "bias"), f"{src}.proj_out.bias", tensors[f"{src}.proj_out.bias"])
  modulation(("final_layer", "modulation"), "norm_out.linear", 2, swap=True)
  linear(("final_layer", "linear"), "proj_out", lambda w: -w.T, lambda b: -b)

  used = {name for name, _ in out.values()}
  for name in tensors:
    if name not in used and name not in _DERIVED_BUFFERS:
      raise CheckpointLayoutError(f"unexpected tensor {name!r} (no pfm parameter maps it)")
  return out


# Buffers the released DiTs save that pfm computes (SD3's sinusoid table).
_DERIVED_BUFFERS = ("pos_embed.pos_embed",)


def check_mapping(params: dict, mapped: dict[tuple[str | int, ...], tuple[str, Any]]) -> None:
  """Checks that ``mapped`` (path -> (source name, value)) fills exactly the flat parameters
  ``params`` (path -> variable or shape-carrying leaf), each with its shape.

  Raises:
    CheckpointLayoutError: naming a parameter that nothing fills, a mapped path the model does
      not have, or a shape that differs.
  """
  for path, (name, value) in mapped.items():
    if path not in params:
      raise CheckpointLayoutError(f"tensor {name!r} maps to {'/'.join(map(str, path))}, which "
                                  "the pfm model does not have")
    if value.shape != params[path].shape:
      raise CheckpointLayoutError(f"tensor {name!r} has shape {value.shape} after conversion; "
                                  f"{'/'.join(map(str, path))} has {params[path].shape}")
  missing = [p for p in params if p not in mapped]
  if missing:
    raise CheckpointLayoutError(f"missing tensor for {'/'.join(map(str, missing[0]))} "
                                f"({len(missing)} parameters unfilled)")


def assign_parameters(model: nnx.Module, mapped: dict[tuple[str | int, ...], tuple[str, Any]]
                      ) -> None:
  """Sets every parameter of ``model`` from ``mapped`` (path -> (source name, value)).

  Raises:
    CheckpointLayoutError: see `check_mapping`.
  """
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  check_mapping(params, mapped)
  for path, (_, value) in mapped.items():
    params[path].set_value(np.asarray(value, params[path].dtype))


def load_official_dit(folder: str, **overrides):
  """The released DiT of ``folder`` (``config.json`` + ``*.safetensors``) as a pfm `MMDiT` and
  its `MMDiTConfig`.

  Raises:
    FileNotFoundError: if the folder lacks its config or weights.
    CheckpointLayoutError: see `dit_parameters` / `assign_parameters`. ValueError: see
      `dit_config_from_official`.
  """
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{folder}: no config.json (a released diffusion_transformer_* "
                            "folder)")
  with open(path) as f:
    fields = dit_config_from_official(json.load(f), **overrides)
  config = models.MMDiTConfig(**fields)
  mapped = dit_parameters(te.read_safetensors(folder), fields)
  model = models.MMDiT(config, rngs=nnx.Rngs(0))
  assign_parameters(model, mapped)
  return model, config


# -- a released folder -> a pfm workdir -----------------------------------------------------------
# The released folders' text encoders: (T5 folder, tokenizer), then the CLIP towers'.
TEXT_FOLDERS = {
    "pyramid_mmdit": (("text_encoder_3", "tokenizer_3"),
                      (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))),
    "pyramid_flux": (("text_encoder_2", "tokenizer_2"), (("text_encoder", "tokenizer"),)),
}


def read_weights(folder: str) -> dict[str, np.ndarray]:
  """Every tensor of a folder's ``*.safetensors`` files or, failing those, of its PyTorch
  ``*.bin`` pickles (read through PyTorch, an optional extra: ``pip install torch``).

  Raises:
    FileNotFoundError: if the folder has neither.
    pfm.errors.UserError: if only ``.bin`` files are there and PyTorch is not installed.
  """
  if glob.glob(os.path.join(folder, "*.safetensors")):
    return te.read_safetensors(folder)
  pickles = sorted(glob.glob(os.path.join(folder, "*.bin")))
  if not pickles:
    raise FileNotFoundError(f"{folder}: no .safetensors or .bin weights")
  try:
    import torch
  except ImportError:
    raise errors.UserError(f"{folder} holds only PyTorch .bin files: install PyTorch to read "
                           "them (pip install torch), or save them as safetensors") from None
  tensors = {}
  for path in pickles:
    for name, value in torch.load(path, map_location="cpu", weights_only=True).items():
      tensors[name] = value.float().numpy()
  return tensors


def _text_encoder_folder(source: str, model: str, tokenizer: str, output: str) -> str:
  """A pfm text-encoder folder ``output``: the released ``model`` folder's config and weights
  (linked, or written as safetensors from ``.bin``) and its ``tokenizer`` folder's
  ``tokenizer.json``.

  Raises:
    pfm.errors.UserError: naming a missing folder or tokenizer.json.
  """
  model_dir, tokenizer_dir = os.path.join(source, model), os.path.join(source, tokenizer)
  for folder in (model_dir, tokenizer_dir):
    if not os.path.isdir(folder):
      raise errors.UserError(f"--source={source}: no {os.path.basename(folder)}/ (the released "
                             "folder's text encoders are expected)")
  tokenizer_json = next((p for p in (os.path.join(tokenizer_dir, "tokenizer.json"),
                                     os.path.join(model_dir, "tokenizer.json"))
                         if os.path.exists(p)), None)
  if tokenizer_json is None:
    raise errors.UserError(
        f"{tokenizer_dir}: no tokenizer.json; write it once with a fast Hugging Face tokenizer: "
        f"python -c \"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained("
        f"'{tokenizer_dir}').save_pretrained('{tokenizer_dir}')\"")
  os.makedirs(output, exist_ok=True)
  shutil.copy(tokenizer_json, os.path.join(output, "tokenizer.json"))
  shutil.copy(os.path.join(model_dir, "config.json"), os.path.join(output, "config.json"))
  weights = glob.glob(os.path.join(model_dir, "*.safetensors"))
  if weights:
    for path in weights:
      link = os.path.join(output, os.path.basename(path))
      if not os.path.lexists(link):
        os.symlink(os.path.abspath(path), link)
  else:
    from safetensors.numpy import save_file
    save_file(read_weights(model_dir), os.path.join(output, "model.safetensors"))
  return output


def released_config(source: str, output: str, variant: str, overrides: dict | None = None):
  """The pfm run config of the released ``variant`` of ``source`` (``configs/released.py``
  with the folder's DiT sizes and the converted VAE and text encoders under ``output``), and the
  DiT's `MMDiTConfig` fields.

  Raises:
    pfm.errors.UserError: for a folder without ``diffusion_transformer_<variant>``.
  """
  dit_folder = os.path.join(source, f"diffusion_transformer_{variant}")
  if not os.path.exists(os.path.join(dit_folder, "config.json")):
    present = sorted(d[len("diffusion_transformer_"):] for d in os.listdir(source)
                     if d.startswith("diffusion_transformer_")) if os.path.isdir(source) else []
    raise errors.UserError(f"--source={source} has no diffusion_transformer_{variant}/ "
                           f"(--variant: one of {present or 'none found'})")
  with open(os.path.join(dit_folder, "config.json")) as f:
    official = json.load(f)
  fields = dit_config_from_official(official)
  family = DIT_CLASSES[official["_class_name"]]
  c = released.get_config(f"{family},{variant}")
  c.data.features = os.path.join(output, "features")  # where pfm.extract writes, to fine-tune
  c.latent.vae = os.path.join(output, "vae")
  c.latent.channels = fields["channels"]
  c.text.t5 = os.path.join(output, "text", "t5")
  c.text.clip = tuple(os.path.join(output, "text", f"clip_{i}")
                      for i in range(len(TEXT_FOLDERS[family][1])))
  c.text.max_length = 128
  c.model.patch_size = fields["patch_size"]
  c.model.text_embed_dim = fields["text_embed_dim"]
  c.model.pooled_embed_dim = fields["pooled_embed_dim"]
  c.model.architecture = released.architecture(fields)
  for key, value in (overrides or {}).items():
    node = c
    *sections, leaf = key.split(".")
    for section in sections:
      node = node[section]
    node[leaf] = value
  return c, fields, family


def convert_released(source: str, output: str, variant: str = "384p", *,
                     overrides: dict | None = None) -> str:
  """Converts a released Pyramid Flow folder into the pfm workdir ``output``: its
  ``config.json`` (``released_config``), the DiT's parameters as the EMA parameters of an orbax
  checkpoint at step 0 (``checkpoints/``), the VAE workdir ``vae/`` and the text-encoder folders
  ``text/``. ``pfm.sample --workdir=output`` samples from it, and ``pfm.train`` fine-tunes it
  with ``--config.train.init_from=output``.

  Args:
    source: the released folder (``diffusion_transformer_<variant>/``, ``causal_video_vae/``,
      ``text_encoder*/``, ``tokenizer*/``).
    output: the workdir to write.
    variant: ``384p``, ``768p`` or ``image`` (miniFLUX).
    overrides: ``{"section.field": value}`` over the config (e.g. a smaller size in tests).

  Raises:
    pfm.errors.UserError: for a missing folder or tokenizer, or an existing checkpoint in
      ``output``.
    CheckpointLayoutError: for a tensor without a parameter or a parameter without a tensor.
  """
  config, fields, family = released_config(source, output, variant, overrides)
  checkpoints = os.path.join(output, "checkpoints")
  if os.path.isdir(checkpoints) and os.listdir(checkpoints):
    raise errors.UserError(f"--output={output} already has checkpoints: choose a new folder")
  spec = spec_lib.resolve(config)
  graphdef, abstract = state_lib.abstract_state(spec)
  mapped = dit_parameters(read_weights(os.path.join(source, f"diffusion_transformer_{variant}")),
                          fields)
  # Checked against the unstacked model, where every tensor has its own parameter.
  unstacked = dataclasses.replace(spec.model, scan_layers=False)
  check_mapping(dict(nnx.to_flat_state(nnx.state(
      nnx.eval_shape(lambda: models.MMDiT(unstacked, rngs=nnx.Rngs(0))), nnx.Param))), mapped)
  values = {path: value for path, (_, value) in mapped.items()}
  if spec.model.scan_layers:  # blocks 0..depth-2 (and the single-stream blocks) stacked
    values = traverse_util.flatten_dict(
        jax.tree.map(np.asarray, stacking.stack_layers(traverse_util.unflatten_dict(values))))
  params = jax.tree_util.tree_map_with_path(
      lambda path, leaf: np.asarray(values[_state_path(path)], leaf.dtype), abstract["ema_params"])
  del values, mapped

  t5, clips = TEXT_FOLDERS[family]
  _text_encoder_folder(source, *t5, config.text.t5)
  for (model, tokenizer), folder in zip(clips, config.text.clip):
    _text_encoder_folder(source, model, tokenizer, folder)
  convert_vae(source, config.latent.vae, family)
  os.makedirs(output, exist_ok=True)
  with open(os.path.join(output, "config.json"), "w") as f:
    f.write(config.to_json(indent=2))
  checkpointer = checkpointing.Checkpointer(checkpoints)
  try:
    checkpointer.save(0, {"ema_params": params}, force=True)
  finally:
    checkpointer.close()
  return output


def _state_path(path) -> tuple[str | int, ...]:
  """A `jax.tree_util` key path of an nnx.State leaf -> its `nnx.to_flat_state` path."""
  keys = []
  for k in path:
    key = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
    if key == "value":  # the Variable's own field
      continue
    keys.append(key)
  return tuple(keys)


def main(argv):
  del argv
  errors.quiet_library_tracebacks()
  if FLAGS.variant:
    output = convert_released(FLAGS.source, FLAGS.output, FLAGS.variant)
    print(f"{output}: the released {FLAGS.variant} model, for pfm.sample --workdir={output} "
          f"and pfm.train --config.train.init_from={output}")
    return
  output = convert_vae(FLAGS.source, os.path.join(FLAGS.output, "vae"), FLAGS.family)
  print(f"{output}: the released VAE, for --config.latent.vae={output}")


if __name__ == "__main__":
  flags.DEFINE_string("source", None, "The released model folder (holding causal_video_vae/).")
  flags.DEFINE_string("output", None, "The folder to write (OUTPUT/vae: a pfm VAE workdir).")
  flags.DEFINE_string("variant", None, "The DiT to convert: 384p, 768p or image (the folder's "
                      "diffusion_transformer_<variant>/); without it only the VAE is converted.")
  flags.DEFINE_enum("family", "pyramid_mmdit", sorted(FAMILIES), "Without --variant: the "
                    "released DiT family the VAE's latents are normalised for.")
  flags.mark_flags_as_required(["source", "output"])
  app.run(errors.exit_on_user_error(main, "pfm.convert"))
