"""Converted official weights compute what the official modules compute: golden fixtures made by
``tools/make_official_fixtures.py`` from the official code (PyTorch is needed only there)."""

from __future__ import annotations

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from flax import nnx

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
  result = subprocess.run([sys.executable, "-m", "pfm.convert", f"--source={source}",
                           "--variant=768p", f"--output={tmp_path / 'y'}"], cwd=repo,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and "no diffusion_transformer_768p" in result.stderr


# -- the released DiT families ----------------------------------------------------------------------

def _dit_inputs(expected, with_history: bool):
  """pfm's packed inputs for the official call of the fixture: one sample per row, the clips
  [history_old, history_recent, current] (or the current unit alone) as frame units 0, 1, 2."""
  from pfm import batch as batch_lib
  from pfm.pyramid import tokens as tokens_lib
  clips = ([expected["history_old"], expected["history_recent"]] if with_history else [])
  clips.append(expected["current"])
  current_grid = (expected["current"].shape[3] // 2, expected["current"].shape[4] // 2)
  tokens, positions, blocks = [], [], []
  for unit, clip in enumerate(clips):
    frames = np.transpose(clip[:, :, 0], (0, 2, 3, 1))          # [B, H, W, C]
    tokens.append(tokens_lib.patchify(frames, 2))
    grid = (clip.shape[3] // 2, clip.shape[4] // 2)
    positions.append(tokens_lib.grid_positions(grid, current_grid))
    blocks.append(np.full(grid[0] * grid[1], unit))
  tokens = np.concatenate(tokens, 1)
  b, length = tokens.shape[:2]
  t = 1.0 - expected["timestep"] / 1000.0                          # the noise-counting timestep
  # pfm's own convention: the clean history at t = 1, the current unit at t; the released
  # models' one conditioning per sample reads only the caption's (the current unit's) t.
  video_t = np.where(np.concatenate(blocks) == len(clips) - 1, t[:, None], 1.0)
  video = batch_lib.VideoTokens(
      tokens=jnp.asarray(tokens), t=jnp.asarray(video_t, jnp.float32),
      segment_ids=jnp.ones((b, length), jnp.int32),
      causal_block=jnp.asarray(np.tile(np.concatenate(blocks), (b, 1)), jnp.int32),
      positions=jnp.asarray(np.tile(np.concatenate(positions), (b, 1, 1))))
  mask = expected["text_mask"].astype(np.int32)
  lt = mask.shape[1]
  text = batch_lib.TextTokens(
      segment_ids=jnp.asarray(mask), t=jnp.asarray(np.repeat(t[:, None], lt, 1), jnp.float32),
      embeddings=jnp.asarray(expected["text"]),
      pooled=jnp.asarray(np.repeat(expected["pooled"][:, None], lt, 1)))
  return video, text, current_grid[0] * current_grid[1]


@pytest.mark.parametrize("family", ["mmdit", "flux"])
def test_the_converted_dits_predict_as_the_official_ones(family):
  """Float32, one sampling call of the released pipeline on a tiny random DiT of each family
  (SD3's MM-DiT; miniFLUX with single-stream blocks and 3-axis RoPE), with a history of two
  units at two resolutions and for the first unit alone: the velocity at the current unit within
  5e-5 of the official module's (measured: 1.0e-5, on values up to 8.4; pfm predicts towards
  data, so the official value negated). Each released option matters: captions outside the
  oldest unit's causal block, per-token conditioning (history at t = 1), or pfm's timestep,
  change the output by more than 0.6."""
  from pfm.pyramid import tokens as tokens_lib
  folder = os.path.join(FIXTURES, family)
  expected = np.load(os.path.join(folder, "expected.npz"))
  model, config = convert.load_official_dit(folder)
  assert config.single_blocks == (2 if family == "flux" else 0)
  for with_history, key in ((True, "output"), (False, "output_first")):
    video, text, n_current = _dit_inputs(expected, with_history)
    out = np.asarray(model(video, text))[:, -n_current:]
    official = tokens_lib.patchify(np.transpose(expected[key][:, :, 0], (0, 2, 3, 1)), 2)
    np.testing.assert_allclose(out, -official, atol=5e-5)
  video, text, n_current = _dit_inputs(expected, True)
  official = tokens_lib.patchify(np.transpose(expected["output"][:, :, 0], (0, 2, 3, 1)), 2)
  for option in ({"text_causal_block": -1}, {"conditioning": "token"}, {"time_input": "data"}):
    other, _ = convert.load_official_dit(folder, **option)
    assert np.abs(np.asarray(other(video, text))[:, -n_current:] + official).max() > 0.3, option


TEXT_ENCODERS = os.path.join(os.path.dirname(FIXTURES), "text_encoders")
# Tiny sizes for the tiny fixtures: 32x32 pixels through the 2x VAE, 2 frame units.
TINY = {"data.height": 32, "data.width": 32, "latent.spatial_compression": 2,
        "latent.temporal_compression": 2, "model.dtype": "float32", "sample.num_frames": 2,
        "sample.first_frame_steps": (2, 2, 2), "sample.later_frame_steps": (1, 1, 1),
        "latent.encode_window": 0, "latent.decode_window": 0}


def released_folder(root, family: str):
  """A folder laid out as the released ones, from the tiny fixtures (DiT, VAE, text encoders)."""
  folder = root / ("pyramid-flow-sd3" if family == "mmdit" else "pyramid-flow-miniflux")
  shutil.copytree(os.path.join(FIXTURES, family), folder / "diffusion_transformer_384p",
                  ignore=shutil.ignore_patterns("expected.npz"))
  shutil.copytree(VAE, folder / "causal_video_vae", ignore=shutil.ignore_patterns("*.npz"))
  towers = ({"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5"}
            if family == "mmdit" else {"text_encoder": "clip_l", "text_encoder_2": "t5"})
  for name, fixture in towers.items():
    shutil.copytree(os.path.join(TEXT_ENCODERS, fixture), folder / name,
                    ignore=shutil.ignore_patterns("tokenizer*", "*.npz"))
    tokenizer = folder / name.replace("text_encoder", "tokenizer")
    tokenizer.mkdir()
    shutil.copy(os.path.join(TEXT_ENCODERS, fixture, "tokenizer.json"), tokenizer)
  return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """Each family's released folder (from the fixtures) converted once, at the tiny sizes."""
  root = tmp_path_factory.mktemp("released")
  return {family: convert.convert_released(str(released_folder(root / family, family)),
                                           str(root / family / "run"), "384p", overrides=TINY)
          for family in ("mmdit", "flux")}


@pytest.mark.parametrize("family", ["mmdit", "flux"])
def test_a_converted_released_folder_is_a_workdir_the_sampler_opens(converted, family):
  """The whole folder (DiT, VAE, text encoders and tokenizers) becomes a workdir whose sampler
  predicts what the official DiT predicts on the fixture's inputs (blocks stacked for scan)."""
  from pfm import sample as sample_lib
  from pfm.pyramid import tokens as tokens_lib
  sampler = sample_lib.Sampler.from_workdir(converted[family])
  assert sampler.spec.pyramid.timestep_windows is not None and sampler.spec.model.scan_layers
  assert sampler.config.sample.negative_prompt and sampler.config.sample.prompt_suffix
  model = nnx.merge(sampler._graphdef, sampler._params)
  expected = np.load(os.path.join(FIXTURES, family, "expected.npz"))
  video, text, n_current = _dit_inputs(expected, True)
  official = tokens_lib.patchify(np.transpose(expected["output"][:, :, 0], (0, 2, 3, 1)), 2)
  np.testing.assert_allclose(np.asarray(model(video, text))[:, -n_current:], -official,
                             atol=5e-5)


def test_the_released_configs_step_through_stages_as_the_official_scheduler():
  """configs/released.py's pyramid against the official scheduler's stages, fixture
  ``scheduler.json``: each stage's noise levels (start, end; the jump-corrected starts), its
  Euler steps (t' = 1 - sigma) and the timesteps the DiT is fed ((1 - t) * 1000 at the model's
  time), within float32 rounding (1e-5 in t, 1e-2 in timesteps out of 1000)."""
  import json
  from configs import released
  from pfm import spec as spec_lib
  from pfm.pyramid import samplers
  official = json.load(open(os.path.join(FIXTURES, "scheduler.json")))["stages"]
  config = released.get_config("pyramid_flux,384p")
  config.data.features = "features"  # what pfm.convert sets; not read here
  pyramid = spec_lib.resolve(config).pyramid
  for order, stage in enumerate(official):           # official stage 0 = pfm's coarsest
    k = pyramid.num_stages - 1 - order
    s, e = pyramid.windows[k]
    np.testing.assert_allclose((s, e), (1 - stage["start_sigma"], 1 - stage["end_sigma"]),
                               atol=1e-5)
    for steps, run in stage["steps"].items():
      grid = samplers.stage_time_grid(int(steps), "released")
      np.testing.assert_allclose(grid, 1 - np.asarray(run["sigmas"]), atol=1e-6)
      model_t = pyramid.model_time(s + grid[:-1] * (e - s), k)
      np.testing.assert_allclose((1 - model_t) * 1000, run["timesteps"], atol=1e-2)


def test_finetune_lora_adapts_a_converted_model_on_the_default_videos(converted, tmp_path):
  """As a user runs it: convert a released folder, cache one default video's latents and caption
  features with the converted VAE and text encoders (pfm.extract), LoRA-fine-tune it with
  configs/finetune_lora.py naming only train.init_from, and sample the adapted model (its
  history, stage-unique timesteps, released Euler grid, negative prompt and VAE decode)."""
  from configs import finetune_lora
  from pfm import extract as extract_lib
  from pfm import sample as sample_lib
  from pfm import train
  from pfm.data import manifest as manifest_lib
  source = converted["flux"]
  manifest = tmp_path / "one.jsonl"
  manifest_lib.write_manifest(str(manifest), manifest_lib.default_manifest()[2:])

  def config():
    c = finetune_lora.get_config("smoke")
    c.train.init_from = source
    c.data.manifest = str(manifest)
    c.data.num_frames = 3             # latent frames: 5 pixel frames through the 2x VAE
    c.data.max_tokens, c.data.max_text_tokens = 256, 256
    c.sample.num_videos = 0
    c.train.num_steps, c.train.checkpoint_every_steps = 2, 2
    return c

  extract_lib.extract(config(), os.path.join(source, "features"), progress=False)
  workdir = str(tmp_path / "ft")
  train.train_and_evaluate(config(), workdir)
  sampler = sample_lib.Sampler.from_workdir(workdir)
  assert sampler.spec.lora is not None and sampler.spec.model.single_blocks == 2
  video = sampler.generate("a red ball", num_frames=2, first_frame_steps=(1, 1, 1),
                           later_frame_steps=(1, 1, 1), progress=False)
  assert video.shape == (3, 32, 32, 3) and video.dtype == np.uint8


def test_a_folder_of_pytorch_pickles_needs_pytorch_and_says_so(tmp_path, monkeypatch):
  """``.bin`` weights are read through PyTorch, an optional extra: without it, one clear line."""
  import builtins
  import sys
  (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name == "torch":
      raise ImportError("No module named 'torch'")
    return real_import(name, *args, **kwargs)

  monkeypatch.delitem(sys.modules, "torch", raising=False)
  monkeypatch.setattr(builtins, "__import__", no_torch)
  with pytest.raises(convert.errors.UserError, match="only PyTorch .bin files: install PyTorch"):
    convert.read_weights(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no .safetensors or .bin"):
    convert.read_weights(str(tmp_path / "empty"))
