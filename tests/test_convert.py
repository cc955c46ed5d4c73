"""Converted official weights compute what the official modules compute: golden fixtures made by
``tools/make_official_fixtures.py`` from the official code (PyTorch is needed only there)."""

from __future__ import annotations

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from pfm import convert
from pfm import latent

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "official")
VAE = os.path.join(FIXTURES, "vae")


def _channels_last(x):
  """Official [B, C, T, H, W] -> pfm [B, T, H, W, C]."""
  return np.transpose(x, (0, 2, 3, 4, 1))


def test_the_converted_vae_encodes_and_decodes_as_the_official_one():
  """Float32, whole clips: the posterior mean and clamped log-variance, and the decoded pixels,
  within 1e-5 of the official module's (measured: 6e-7), 5 frames of 16x16 to 3 latent frames of
  8x8 and back."""
  expected = np.load(os.path.join(VAE, "expected.npz"))
  model = convert.load_official_vae(VAE)
  assert (model.config.spatial_factor, model.config.temporal_factor) == (2, 2)
  posterior = model.encode(jnp.asarray(_channels_last(expected["x"])))
  np.testing.assert_allclose(posterior.mean, _channels_last(expected["mean"]), atol=1e-5)
  np.testing.assert_allclose(posterior.logvar, _channels_last(expected["logvar"]), atol=1e-5)
  decoded = model.decode(jnp.asarray(_channels_last(expected["z"])))
  np.testing.assert_allclose(decoded, _channels_last(expected["decoded"]), atol=1e-5)


def test_a_missing_or_unexpected_tensor_is_refused_by_name(tmp_path):
  tensors = load_file(os.path.join(VAE, "diffusion_pytorch_model.safetensors"))
  for name, edit in (("missing", lambda t: t.pop("decoder.conv_out.conv.bias")),
                     ("unexpected", lambda t: t.update({"encoder.extra.weight": np.zeros(2)}))):
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(os.path.join(VAE, "config.json"), folder)
    changed = dict(tensors)
    edit(changed)
    save_file(changed, str(folder / "diffusion_pytorch_model.safetensors"))
    message = "decoder/conv_out/conv/bias" if name == "missing" else "encoder.extra.weight"
    with pytest.raises(convert.CheckpointLayoutError, match=message):
      convert.load_official_vae(str(folder))


def test_a_converted_vae_is_a_vae_workdir(tmp_path):
  model = convert.load_official_vae(VAE)
  latent.save_vae(str(tmp_path / "vae"), model)
  loaded = latent.load_vae(str(tmp_path / "vae"))
  x = jnp.asarray(_channels_last(np.load(os.path.join(VAE, "expected.npz"))["x"]))
  np.testing.assert_allclose(loaded.encode(x).mean, model.encode(x).mean, atol=1e-6)


def test_the_convert_command_writes_a_vae_workdir_with_the_familys_normalisation(tmp_path):
  import json
  import subprocess
  import sys
  source = tmp_path / "pyramid-flow-miniflux"
  shutil.copytree(VAE, source / "causal_video_vae")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-m", "pfm.convert", f"--source={source}",
                           f"--output={tmp_path / 'out'}", "--family=pyramid_flux"],
                          cwd=repo, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  fields = json.loads((tmp_path / "out" / "vae" / "vae.json").read_text())
  assert fields["image_shift"] == -0.04 and fields["video_scale"] == pytest.approx(1 / 3.0986)
  model = latent.load_vae(str(tmp_path / "out" / "vae"))
  expected = np.load(os.path.join(VAE, "expected.npz"))
  np.testing.assert_allclose(model.decode(jnp.asarray(_channels_last(expected["z"]))),
                             _channels_last(expected["decoded"]), atol=1e-5)
  result = subprocess.run([sys.executable, "-m", "pfm.convert", f"--source={tmp_path}",
                           f"--output={tmp_path / 'x'}"], cwd=repo, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 1 and "no causal_video_vae/config.json" in result.stderr
