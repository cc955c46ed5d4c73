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

The tests check the converted modules against the official ones' outputs on a tiny random
checkpoint (``tools/make_official_fixtures.py``).

``python -m pfm.convert --source=/path/to/pyramid-flow-sd3 --output=runs/released
[--family=pyramid_mmdit|pyramid_flux]`` converts the folder's ``causal_video_vae`` into the VAE
workdir ``OUTPUT/vae`` (with the family's latent normalisation), which ``pfm.extract`` and
``pfm.sample`` open as ``config.latent.vae``. The DiT families are not converted yet.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from absl import app, flags
import numpy as np
from flax import nnx

from pfm import errors
from pfm import latent
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


def main(argv):
  del argv
  errors.quiet_library_tracebacks()
  output = convert_vae(FLAGS.source, os.path.join(FLAGS.output, "vae"), FLAGS.family)
  print(f"{output}: the released VAE, for --config.latent.vae={output}")


if __name__ == "__main__":
  flags.DEFINE_string("source", None, "The released model folder (holding causal_video_vae/).")
  flags.DEFINE_string("output", None, "The folder to write (OUTPUT/vae: a pfm VAE workdir).")
  flags.DEFINE_enum("family", "pyramid_mmdit", sorted(FAMILIES), "The released DiT family "
                    "the VAE's latents are normalised for.")
  flags.mark_flags_as_required(["source", "output"])
  app.run(errors.exit_on_user_error(main, "pfm.convert"))
