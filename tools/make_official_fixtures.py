r"""Writes golden fixtures of the official Pyramid Flow modules (tests/fixtures/official/).

Run once, outside the package's environment, with PyTorch, the official code's dependencies and a
checkout of the official repository (never needed by pfm or its tests):

  python -m venv /tmp/fixtures && /tmp/fixtures/bin/pip install torch==2.13.0 \
      diffusers==0.42.1 timm==1.0.31 einops safetensors numpy
  git clone https://github.com/jy0205/Pyramid-Flow /tmp/Pyramid-Flow   # these were made at 3040d71
  /tmp/fixtures/bin/python tools/make_official_fixtures.py --official=/tmp/Pyramid-Flow \
      --output=tests/fixtures/official

What it makes, deterministic (torch.manual_seed(0)):

* ``vae/``: a tiny random `video_vae.CausalVideoVAE` (the released VAE's module, 2 blocks of 8 and
  16 channels, 2x spatial and 2x temporal, 4 latent channels, GroupNorm of 4 groups), saved with
  diffusers' ``save_pretrained`` as the released ``causal_video_vae`` folder is
  (``config.json`` + ``diffusion_pytorch_model.safetensors``). Every parameter, the norms' scales
  and shifts included, is drawn at random so that a transposed or swapped tensor shows.
* ``vae/expected.npz``: ``x`` float32 [1, 3, 5, 16, 16] in [-1, 1] (the official [B, C, T, H, W]
  layout); ``mean`` and ``logvar`` of ``encode(x)`` (logvar clamped, as the official posterior);
  ``z`` a fixed latent [1, 4, 3, 8, 8] and ``decoded`` = ``decode(z)``, all float32, whole clips
  (no temporal chunks, no tiles).

* ``mmdit/`` and ``flux/``: tiny random DiTs of the two released families,
  `pyramid_dit.mmdit_modules.PyramidDiffusionMMDiT` (SD3's MM-DiT: 2 joint blocks, width 32, 2
  heads) and `pyramid_dit.flux_modules.PyramidFluxTransformer` (miniFLUX: 2 joint and 2
  single-stream blocks, width 32, 2 heads, 3-axis RoPE (4, 6, 6)), their caption widths those
  of the tiny text encoders of ``tests/fixtures/text_encoders``, built with the options the
  released pipeline sets (`build_pyramid_dit`: temporal causal attention, interpolated history
  positions, no flash attention; the MM-DiT with its temporal RoPE and T5 mask) and saved with
  ``save_pretrained`` as the released ``diffusion_transformer_*`` folders are. Every parameter
  is random (the zero-initialised modulations and output layer included).
* ``<family>/expected.npz``: one sampling call of each as the released pipeline makes it
  (`generate_one_unit`): a batch of 2 captions (T5-like features ``text`` [2, 6, 32] with
  ``text_mask`` [2, 6], the second caption shorter, pooled ``pooled`` [2, 48] (MM-DiT: two
  CLIP projections) or [2, 32] (miniFLUX: one CLIP pooled state)) and timesteps
  ``timestep`` [2] (on the 0..1000 noise scale), for a current unit ``current`` [2, 4, 1, 8, 8]
  after a history of ``history_old`` [2, 4, 1, 4, 4] (a coarser level) and ``history_recent``
  [2, 4, 1, 8, 8], in the official [B, C, T, H, W] layout; ``output`` the official prediction at
  the current unit (a velocity towards noise), and ``output_first`` that of the first unit
  (``current`` alone, no history).

* ``scheduler.json``: the official ``PyramidFlowMatchEulerDiscreteScheduler`` of the released
  pipeline (3 stages, ``stage_range`` [0, 1/3, 2/3, 1], gamma 1/3, shift 1): for each stage
  (coarsest first) and a few step counts, the timesteps the DiT is fed and the sigmas the Euler
  steps move between, and the stages' start and end noise levels.

The official code imports IPython only for a debugging hook; a stub stands in for it.
"""

from __future__ import annotations

import argparse
import os
import sys
import types

import numpy as np
import torch

VAE_CONFIG = dict(
    encoder_in_channels=3, encoder_out_channels=4, encoder_layers_per_block=(1, 1),
    encoder_down_block_types=("DownEncoderBlockCausal3D",) * 2,
    encoder_block_out_channels=(8, 16), encoder_spatial_down_sample=(True, False),
    encoder_temporal_down_sample=(True, False), encoder_block_dropout=(0.0, 0.0),
    encoder_norm_num_groups=4,
    decoder_in_channels=4, decoder_layers_per_block=(1, 1),
    decoder_up_block_types=("UpDecoderBlockCausal3D",) * 2, decoder_block_out_channels=(8, 16),
    decoder_spatial_up_sample=(True, False), decoder_temporal_up_sample=(True, False),
    decoder_block_dropout=(0.0, 0.0), decoder_norm_num_groups=4)


def make_vae(official: str, output: str) -> None:
  sys.path.insert(0, official)
  sys.modules.setdefault("IPython", types.SimpleNamespace(embed=lambda *a, **k: None))
  from video_vae.modeling_causal_vae import CausalVideoVAE
  torch.manual_seed(0)
  model = CausalVideoVAE(**VAE_CONFIG).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      scale = 0.3 if p.ndim > 1 else 0.2
      base = 1.0 if "norm" in name and name.endswith(".weight") else 0.0  # norm scales near 1
      p.copy_(base + scale * torch.randn_like(p) / (np.sqrt(p[0].numel()) if p.ndim > 1 else 1))
  folder = os.path.join(output, "vae")
  os.makedirs(folder, exist_ok=True)
  model.save_pretrained(folder, safe_serialization=True)
  g = torch.Generator().manual_seed(1)
  x = torch.rand((1, 3, 5, 16, 16), generator=g) * 2 - 1
  z = torch.randn((1, 4, 3, 8, 8), generator=g)
  with torch.no_grad():
    posterior = model.encode(x).latent_dist
    decoded = model.decode(z).sample
  np.savez(os.path.join(folder, "expected.npz"), x=x.numpy(), mean=posterior.mean.numpy(),
           logvar=posterior.logvar.numpy(), z=z.numpy(), decoded=decoded.numpy())
  print(f"{folder}: {sum(p.numel() for p in model.parameters())} parameters")


MMDIT_CONFIG = dict(
    sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
    num_attention_heads=2, caption_projection_dim=32, pooled_projection_dim=48,
    pos_embed_max_size=12, max_num_frames=8, qk_norm="rms_norm", pos_embed_type="sincos",
    temp_pos_embed_type="rope", joint_attention_dim=32, use_flash_attn=False,
    use_temporal_causal=True, use_t5_mask=True, add_temp_pos_embed=True,
    interp_condition_pos=True)
FLUX_CONFIG = dict(
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
    axes_dims_rope=[4, 6, 6], use_flash_attn=False, use_temporal_causal=True,
    interp_condition_pos=True)


def _randomise(model) -> None:
  """Every parameter drawn at random, so a transposed, swapped or zero tensor shows."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim > 1:
        p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
      elif "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))


def make_dit(official: str, output: str, family: str) -> None:
  sys.path.insert(0, official)
  sys.modules.setdefault("IPython", types.SimpleNamespace(embed=lambda *a, **k: None))
  # The DiT modules without `pyramid_dit/__init__.py`, which imports the whole pipeline
  # (torchvision, the VAE, ...): a bare package object with the folder as its path.
  package = types.ModuleType("pyramid_dit")
  package.__path__ = [os.path.join(official, "pyramid_dit")]
  sys.modules.setdefault("pyramid_dit", package)
  # The DiTs use only `trainer_misc`'s sequence-parallel queries (all False outside a parallel
  # run); its `utils` imports a training stack (tensorboardX, timm, ...) that is not needed.
  misc = types.ModuleType("trainer_misc")
  misc.is_sequence_parallel_initialized = lambda: False
  for name in ("get_sequence_parallel_group", "get_sequence_parallel_world_size",
               "get_sequence_parallel_rank", "all_to_all"):
    setattr(misc, name, None)
  sys.modules.setdefault("trainer_misc", misc)
  torch.manual_seed(0)
  if family == "mmdit":
    from pyramid_dit.mmdit_modules import PyramidDiffusionMMDiT
    model = PyramidDiffusionMMDiT(**MMDIT_CONFIG).eval()
  else:
    from pyramid_dit.flux_modules import PyramidFluxTransformer
    model = PyramidFluxTransformer(**FLUX_CONFIG).eval()
  _randomise(model)
  folder = os.path.join(output, family)
  os.makedirs(folder, exist_ok=True)
  model.save_pretrained(folder, safe_serialization=True)
  g = torch.Generator().manual_seed(2)
  config = MMDIT_CONFIG if family == "mmdit" else FLUX_CONFIG
  inputs = dict(
      text=torch.randn((2, 6, config["joint_attention_dim"]), generator=g),
      text_mask=torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]]),
      pooled=torch.randn((2, config["pooled_projection_dim"]), generator=g),
      timestep=torch.tensor([750.0, 500.0]),
      history_old=torch.randn((2, 4, 1, 4, 4), generator=g),
      history_recent=torch.randn((2, 4, 1, 8, 8), generator=g),
      current=torch.randn((2, 4, 1, 8, 8), generator=g))
  def call(sample):
    with torch.no_grad():
      return model(sample=[sample], encoder_hidden_states=inputs["text"],
                   encoder_attention_mask=inputs["text_mask"],
                   pooled_projections=inputs["pooled"], timestep_ratio=inputs["timestep"])[0]
  output_history = call([inputs["history_old"], inputs["history_recent"], inputs["current"]])
  output_first = call([inputs["current"]])
  np.savez(os.path.join(folder, "expected.npz"), output=output_history.numpy(),
           output_first=output_first.numpy(), **{k: v.numpy() for k, v in inputs.items()})
  print(f"{folder}: {sum(p.numel() for p in model.parameters())} parameters")


def make_scheduler(official: str, output: str) -> None:
  import json
  sys.path.insert(0, official)
  from diffusion_schedulers.scheduling_flow_matching import PyramidFlowMatchEulerDiscreteScheduler
  scheduler = PyramidFlowMatchEulerDiscreteScheduler(
      shift=1.0, stages=3, stage_range=[0, 1 / 3, 2 / 3, 1], gamma=1 / 3)
  stages = []
  for stage in range(3):
    runs = {}
    for steps in (1, 2, 5, 20):
      scheduler.set_timesteps(steps, stage)
      runs[steps] = dict(timesteps=scheduler.timesteps.tolist(),
                         sigmas=scheduler.sigmas.tolist())
    stages.append(dict(start_sigma=scheduler.start_sigmas[stage],
                       end_sigma=scheduler.end_sigmas[stage],
                       ori_start_sigma=scheduler.ori_start_sigmas[stage], steps=runs))
  with open(os.path.join(output, "scheduler.json"), "w") as f:
    json.dump(dict(stages=stages), f, indent=1)
  print(f"{output}/scheduler.json")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--official", required=True, help="a checkout of jy0205/Pyramid-Flow")
  parser.add_argument("--output", default="tests/fixtures/official")
  parser.add_argument("--parts", default="vae,mmdit,flux,scheduler", help="comma-separated fixtures")
  args = parser.parse_args()
  parts = args.parts.split(",")
  if "vae" in parts:
    make_vae(os.path.abspath(args.official), args.output)
  if "scheduler" in parts:
    make_scheduler(os.path.abspath(args.official), args.output)
  for family in ("mmdit", "flux"):
    if family in parts:
      make_dit(os.path.abspath(args.official), args.output, family)


if __name__ == "__main__":
  main()
