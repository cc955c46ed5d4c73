"""The latent pipeline: feature extraction (shards, index, resume, skips), training on cached
latents in every mode, frozen T5 + CLIP caption features, and sampling through the VAE."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import latent as latent_config
from pfm import extract as extract_lib
from pfm import latent
from pfm import objective
from pfm import sample as sample_lib
from pfm import spec as spec_lib
from pfm import state as state_lib
from pfm import validation
from pfm.data import features as features_lib
from pfm.data import manifest as manifest_lib
from pfm.data import pipeline
from pfm.data import video
from pfm.models import vae as vae_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_FIXTURES = os.path.join(REPO, "tests", "fixtures", "text_encoders")
LATENT_FRAMES = 4  # extracted per clip: 7 pixel frames with the smoke VAE's f_t = 2


def _config(vae_dir, features_dir, manifest="", **overrides):
  c = latent_config.get_config("smoke")
  c.latent.vae = str(vae_dir)
  c.data.features = str(features_dir)
  c.data.manifest = str(manifest)
  c.data.num_frames = LATENT_FRAMES
  c.data.max_tokens = 256
  c.extract.clip_hop = 48
  c.update_from_flattened_dict(overrides)
  return c


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
  """An (untrained) smoke VAE workdir: 2x spatial, 2x temporal, 4 latent channels."""
  folder = tmp_path_factory.mktemp("vae")
  latent.save_vae(str(folder), vae_lib.CausalVideoVAE(vae_lib.vae_config("smoke"),
                                                      rngs=nnx.Rngs(0)))
  return folder


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
  """The three default videos, an image, a file that is not a video and a missing one."""
  folder = tmp_path_factory.mktemp("media")
  records = manifest_lib.default_manifest()
  rng = np.random.default_rng(0)
  image = folder / "still.png"
  Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(image)
  (folder / "broken.mp4").write_bytes(b"not a video at all")
  records += [{"image": str(image), "text": "a still"},
              {"video": str(folder / "broken.mp4"), "text": "broken"},
              {"video": str(folder / "missing.mp4"), "text": "missing"}]
  path = folder / "manifest.jsonl"
  manifest_lib.write_manifest(str(path), records)
  return path


@pytest.fixture(scope="module")
def features_dir(tmp_path_factory, vae_dir, manifest):
  folder = tmp_path_factory.mktemp("features") / "demo"
  extract_lib.extract(_config(vae_dir, folder, manifest), str(folder), progress=False)
  return folder


def _expected_clips(c):
  """Clips per record of the manifest: the videos' clip starts, 1 for the image, 0 if broken."""
  spec = spec_lib.resolve(c)
  span = (spec.pixel_frames(c.data.num_frames) - 1) * c.data.frame_stride + 1
  counts = []
  for record in manifest_lib.default_manifest():
    frames = video.probe(record["video"]).num_frames
    counts.append(len(extract_lib.clip_starts(frames, span, c.extract.clip_hop)))
  return counts + [1, 0, 0]


def test_extract_writes_shards_an_index_and_counts_skips(features_dir, vae_dir, manifest):
  c = _config(vae_dir, features_dir, manifest)
  index = features_lib.load_index(str(features_dir))
  assert index["num_clips"] == sum(_expected_clips(c))
  assert index["skipped"] == {"unreadable": 1, "missing": 1}
  assert len(index["shards"]) == 3  # 6 records, 2 per shard
  source = features_lib.FeatureSource(str(features_dir))
  first = source[0]
  assert first["mean"].shape == first["std"].shape == (LATENT_FRAMES, 16, 16, 4)
  assert first["text"] == manifest_lib.DEFAULT_CAPTIONS["bigbuckbunny.mp4"]
  assert first["source"].endswith("bigbuckbunny.mp4#0")
  # The stored moments are the VAE's posterior of the clip's frames, normalised.
  vae = latent.load_vae(str(vae_dir))
  frames = video.load_video(manifest_lib.default_manifest()[0]["video"], (32, 32))[:7]
  posterior = vae.encode(jnp.asarray(video.to_float(frames))[None])
  np.testing.assert_allclose(first["mean"], vae.normalize(posterior.mean)[0], atol=1e-5)
  scale = np.array([vae.config.image_scale] + [vae.config.video_scale] * 3)[:, None, None, None]
  np.testing.assert_allclose(first["std"], posterior.std[0] * scale, rtol=1e-5, atol=1e-6)
  image = source[len(source) - 1]
  assert image["mean"].shape == (1, 16, 16, 4) and image["text"] == "a still"


def test_a_rerun_skips_finished_shards_and_resumes_a_partial_one(features_dir, vae_dir,
                                                                 manifest, tmp_path,
                                                                 monkeypatch):
  folder = tmp_path / "resumed"
  c = _config(vae_dir, folder, manifest)
  real_clips = extract_lib._record_clips
  calls = []

  def killed_at_record_3(record, spec):
    calls.append(manifest_lib.record_path(record))
    if len(calls) == 4:  # the second record of shard 1
      raise KeyboardInterrupt
    return real_clips(record, spec)

  monkeypatch.setattr(extract_lib, "_record_clips", killed_at_record_3)
  with pytest.raises(KeyboardInterrupt):
    extract_lib.extract(c, str(folder), progress=False)
  assert (folder / "shard-00000.json").exists() and not (folder / "index.json").exists()
  assert sorted(os.listdir(folder / "partial" / "shard-00001")) == ["record-00000.msgpack"]
  with pytest.raises(features_lib.FeatureCacheError, match="not finished"):
    features_lib.load_index(str(folder))
  calls.clear()
  monkeypatch.setattr(extract_lib, "_record_clips", real_clips)
  spy = []
  monkeypatch.setattr(extract_lib, "_record_clips",
                      lambda record, spec: spy.append(record) or real_clips(record, spec))
  # Resumed as two processes: process 1 completes shard 1, process 0 writes shard 2 and the
  # index (shard 0 was finished before).
  report = extract_lib.extract(c, str(folder), process_index=1, process_count=2,
                               progress=False)
  assert (report.shards_finished_before, report.shards_written) == (0, 1)
  assert len(spy) == 1 and not (folder / "index.json").exists()
  report = extract_lib.extract(c, str(folder), process_index=0, process_count=2,
                               progress=False)
  assert (report.shards_finished_before, report.shards_written) == (1, 1)
  assert len(spy) == 3  # the rest of shard 1 and shard 2; nothing done twice
  assert not (folder / "partial").exists()
  ours, reference = (features_lib.FeatureSource(str(f)) for f in (folder, features_dir))
  assert len(ours) == len(reference)
  for i in range(len(ours)):
    np.testing.assert_array_equal(ours[i]["mean"], reference[i]["mean"])


def test_a_folder_made_with_other_settings_is_refused(features_dir, vae_dir, manifest):
  c = _config(vae_dir, features_dir, manifest, **{"extract.clip_hop": 5})
  with pytest.raises(features_lib.FeatureCacheError, match="extract.clip_hop: 48 in the folder"):
    extract_lib.extract(c, str(features_dir), progress=False)
  wrong = _config(vae_dir, features_dir, manifest, **{"latent.channels": 8})
  with pytest.raises(Exception, match="config.latent.channels=8, but the VAE"):
    extract_lib.extract(wrong, str(features_dir), progress=False)


def test_training_draws_a_fresh_posterior_sample_each_time():
  """Over many draws, the latent tokens of a cached clip have the posterior's mean and std."""
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(1, 8, 8, 4)).astype(np.float32)
  std = rng.uniform(0.1, 0.5, size=(1, 8, 8, 4)).astype(np.float32)
  spec = spec_lib.resolve(_config("v", "f", **{"pyramid.stage_weights": (1.0, 0.0, 0.0)}))
  make = pipeline.MakeSample(
      height=16, width=16, num_frames=3, frame_stride=1, patch_size=2, pyramid=spec.pyramid,
      stage_weights=(1.0, 0.0, 0.0), caption_length=48, num_records=1,
      features={0: {"mean": mean, "std": std, "text": "x"}})
  draws = np.stack([make.random_map({"feature": 0}, np.random.default_rng(s))["clean_end"]
                    for s in range(4000)])
  from pfm.pyramid import tokens
  np.testing.assert_allclose(draws.mean(0), tokens.patchify(mean[0], 2), atol=0.03)
  np.testing.assert_allclose(draws.std(0), tokens.patchify(std[0], 2), rtol=0.08)


MODES = {
    "autoregressive": {},
    "vanilla": dict(mode="full_sequence", **{"pyramid.num_stages": 1,
                                             "pyramid.stage_weights": (1.0,)}),
    "tpdiff": dict(mode="full_sequence", **{"pyramid.spatial": False,
                                            "pyramid.frame_rate_schedule": "2"}),
    "spatial": dict(mode="full_sequence"),
    "spatiotemporal": dict(mode="full_sequence", **{"pyramid.frame_rate_schedule": "2"}),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_trains_on_cached_latents(mode, features_dir, vae_dir, manifest):
  """A packed batch of latent tokens (patch 2 on 4 channels) and one loss and gradient of the
  smoke MM-DiT, finite, in each mode."""
  overrides = {k: v for k, v in MODES[mode].items() if k != "mode"}
  c = _config(vae_dir, features_dir, manifest, **overrides)
  c.mode = MODES[mode].get("mode", "autoregressive")
  if c.mode == "full_sequence":
    c.data.num_frames = LATENT_FRAMES
  else:
    c.data.num_frames = 3
  spec = validation.validate(c)
  batch = next(iter(pipeline.create_dataset(spec, seed=0)))
  assert batch.clean_end.shape == (c.data.batch_size, c.data.max_tokens, 2 * 2 * 4)
  assert np.all(np.abs(batch.clean_end) < 20)
  graphdef, params = nnx.split(state_lib.build_model(spec), nnx.Param)

  def loss_fn(params):
    inputs, target, weight, path = objective.corrupt_packed_batch(
        jax.random.key(0), jax.tree.map(jnp.asarray, batch), spec.objective)
    output = nnx.merge(graphdef, params)(*inputs)
    prediction = objective.to_target(output, inputs[0], path, spec.objective)
    return objective.weighted_mse(prediction, target, weight)[0]

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_t5_and_clip_caption_features_are_cached_trained_on_and_sampled_with(
    vae_dir, tmp_path):
  """text.encoder = "t5_clip" (Pyramid Flow's layout: T5 token features, the CLIP towers'
  pooled projections concatenated), with the tiny fixture encoders."""
  records = manifest_lib.default_manifest()[2:]  # one video
  path = tmp_path / "one.jsonl"
  manifest_lib.write_manifest(str(path), records)
  t5 = os.path.join(TEXT_FIXTURES, "t5")
  clips = (os.path.join(TEXT_FIXTURES, "clip_l"), os.path.join(TEXT_FIXTURES, "clip_g"))
  t5_width = json.load(open(os.path.join(t5, "config.json")))["d_model"]
  pooled = sum(json.load(open(os.path.join(f, "config.json")))["projection_dim"] for f in clips)
  c = _config(vae_dir, tmp_path / "features", path, **{
      "text.encoder": "t5_clip", "text.t5": t5, "text.clip": clips, "text.max_length": 16,
      "model.text_embed_dim": t5_width, "model.pooled_embed_dim": pooled,
      "data.max_text_tokens": 64, "data.num_frames": 3})
  c.sample.first_frame_steps = (1, 1, 1)
  extract_lib.extract(c, str(tmp_path / "features"), progress=False)
  record = features_lib.FeatureSource(str(tmp_path / "features"))[0]
  encoder = latent.CaptionEncoder.from_config(spec_lib.complete(c))
  expected = encoder([records[0]["text"]])[0]
  from pfm.models import text_encoders as te
  ids, mask = te.tokenize(te.load_tokenizer(t5), [records[0]["text"]], 16)
  n = int(mask.sum())
  np.testing.assert_allclose(record["text_embeddings"],
                             te.T5Encoder.from_pretrained(t5)(ids, mask)[0, :n], atol=1e-5)
  np.testing.assert_allclose(record["pooled"], expected["pooled"], atol=1e-6)
  assert record["pooled"].shape == (pooled,)

  spec = validation.validate(c)
  batch = next(iter(pipeline.create_dataset(spec, seed=0)))
  assert batch.text_embeddings.shape == (c.data.batch_size, 64, t5_width)
  assert batch.text_pooled.shape == (c.data.batch_size, 64, pooled)
  model = state_lib.build_model(spec)
  inputs, *_ = objective.corrupt_packed_batch(jax.random.key(0), jax.tree.map(
      jnp.asarray, batch), spec.objective)
  assert inputs[1].tokens is None and inputs[1].embeddings is not None
  assert np.all(np.isfinite(model(*inputs)))

  graphdef, params = nnx.split(model, nnx.Param)
  sampler = sample_lib.Sampler(spec, graphdef, params)
  text = sampler.caption(records[0]["text"])
  np.testing.assert_allclose(text.embeddings[0, :n], record["text_embeddings"], atol=1e-5)
  assert np.all(text.embeddings[1] == 0) and int(text.segment_ids[1].sum()) == 1
  frames = sampler.generate(records[0]["text"], num_frames=1, progress=False)
  assert frames.shape == (1, 32, 32, 3) and frames.dtype == np.uint8


def test_the_latent_chain_as_a_user_runs_it(features_dir, vae_dir, manifest, tmp_path):
  """pfm.train on --config.data.features (text-to-video samples at its end), then pfm.sample
  (image-to-video) decoding through the VAE to an mp4 of 1 + f_t (N - 1) pixel frames."""
  workdir = tmp_path / "run"
  flags = [f"--config.latent.vae={vae_dir}", f"--config.data.features={features_dir}",
           f"--config.data.manifest={manifest}", f"--config.data.num_frames={LATENT_FRAMES}",
           "--config.data.max_tokens=256", "--config.extract.clip_hop=48"]
  env = dict(os.environ, PYTHONPATH=REPO)
  run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env,
                                     capture_output=True, text=True, timeout=900)
  result = run("pfm.train", "--config=configs/latent.py:smoke", f"--workdir={workdir}",
               *flags, "--config.train.num_steps=4", "--config.train.sample_every_steps=4",
               "--config.train.checkpoint_every_steps=4")
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads((workdir / "samples" / "step_0000004" / "metrics.json").read_text())
  assert metrics["num_prompts"] == 1
  config = json.loads((workdir / "config.json").read_text())
  assert config["data"]["features"] == str(features_dir)
  image = tmp_path / "first.png"
  Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(image)
  output = tmp_path / "out.mp4"  # (text-to-video ran at the end of training)
  result = run("pfm.sample", f"--workdir={workdir}", "--prompt=a rabbit", "--num_frames=3",
               f"--output={output}", f"--image={image}")
  assert result.returncode == 0, result.stderr[-3000:]
  frames = video.load_video(str(output), (32, 32))
  assert frames.shape == (5, 32, 32, 3)  # 1 + 2 * (3 - 1)
  assert len(os.listdir(workdir / "samples" / "step_0000004")) == 2  # sample_0.mp4, metrics
  shutil.rmtree(workdir)


def test_the_384p_config_carries_the_papers_sizes_and_validates():
  from configs import pyramid_flow_384p
  c = pyramid_flow_384p.get_config()
  c.data.features = "/features/384p"
  spec = validation.validate(c)
  assert spec.frame_shape == (48, 80, 16) and spec.pixel_frames(c.data.num_frames) == 121
  assert spec.model.patch_dim == 2 * 2 * 16 and spec.model.depth == 24
  assert spec.model.text_embed_dim == 4096 and spec.model.pooled_embed_dim == 2048
  from pfm.data import layout
  assert layout.max_tokens_per_sample(16, height=48, width=80, patch_size=2, num_stages=3) == 2940
  # The 2B model's guided sampling step at 384p compiles here, on abstract parameters.
  from pfm import benchmark
  memory = benchmark.sampling_memory(c)
  assert 1.9 < memory["params_billions"] < 2.2 and memory["video_tokens"] == 2944
  assert memory["argument_gib"] == pytest.approx(memory["params_billions"] * 4e9 / 2**30, rel=0.01)
  assert memory["temp_gib"] > 0


def test_invalid_latent_configs_name_the_field(vae_dir, features_dir):
  from pfm import errors
  for overrides, field in (({"latent.channels": 0}, "config.latent.channels"),
                           ({"text.encoder": "t5"}, "config.model.text_embed_dim"),
                           ({"text.encoder": "bert"}, "config.text.encoder"),
                           ({"data.height": 30, "data.width": 30}, "config.data.height")):
    with pytest.raises(errors.ConfigError, match=field):
      validation.validate(_config(vae_dir, features_dir, **overrides))
  c = _config(vae_dir, features_dir, **{"data.num_frames": 6, "data.max_tokens": 512})
  with pytest.raises(ValueError, match="config.data.num_frames=6: the clips"):
    pipeline.create_dataset(validation.validate(c), seed=0)


def test_two_processes_extract_their_own_shards_into_one_index(features_dir, vae_dir, manifest,
                                                               tmp_path):
  """``launch.local`` runs ``pfm.extract`` as 2 processes joined by jax.distributed: each writes
  its shards (0 and 2, or 1), process 0 the index, and the clips equal one process's."""
  from launch import local
  folder = tmp_path / "two"
  command = [sys.executable, "-m", "pfm.extract", "--config=configs/latent.py:smoke",
             f"--config.latent.vae={vae_dir}", f"--config.data.manifest={manifest}",
             f"--config.data.num_frames={LATENT_FRAMES}", "--config.data.max_tokens=256",
             "--config.extract.clip_hop=48", f"--output={folder}"]
  result = local.launch(command, num_processes=2, devices_per_process=1, cwd=REPO, echo=False,
                        timeout=600)
  result.check()
  assert "1 new shards" in result.outputs[1] and "2 new shards" in result.outputs[0]
  ours, reference = (features_lib.FeatureSource(str(f)) for f in (folder, features_dir))
  assert len(ours) == len(reference) and ours.index["skipped"] == reference.index["skipped"]
  for i in range(len(ours)):
    np.testing.assert_allclose(ours[i]["mean"], reference[i]["mean"], atol=1e-6)
