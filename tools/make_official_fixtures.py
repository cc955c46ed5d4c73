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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--official", required=True, help="a checkout of jy0205/Pyramid-Flow")
  parser.add_argument("--output", default="tests/fixtures/official")
  args = parser.parse_args()
  make_vae(os.path.abspath(args.official), args.output)


if __name__ == "__main__":
  main()
