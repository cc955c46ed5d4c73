"""The sampler's options and its sharded layout (``pfm/sample.py``).

Negative prompt and decaying guidance are checked numerically with a stand-in model whose
velocity is a known function of the caption: the sampler's output is then affine in the guided
velocity, so the guided velocity can be read back from the videos. Batching, continuing a video
and text-to-image run the smoke MM-DiT of a workdir written in a second
(``tests/sample_fixtures.py``), and so do the ``pfm.sample`` commands, which share their compiled
programs with the in-process tests through the persistent compilation cache
(``tests/conftest.py``). The sharded sampler runs on 8 CPU devices in a subprocess
(``tests/sample_layouts_check.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pfm import sample as sample_lib
from pfm import spec as spec_lib
from pfm.data import text as text_lib
from pfm.data import video as video_lib
from tests import sample_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a rabbit on a hill", "a bird"]
NEGATIVE = ["", "blurry"]
# Sharded against one device: float32 frame units (pixels in [-1, 1]) after 3 units x 3 Euler
# steps (autoregressive) or 3 steps (full sequence) with sums over the devices in another order.
SHARDED_TOLERANCE = 2e-5
# One batch against single calls: the same rows, in matrix products of another size.
BATCH_TOLERANCE = 2e-5


# --- a model whose velocity is known -------------------------------------------------------------


class CaptionVelocity(nnx.Module):
  """The MM-DiT's interface with the velocity ``c(caption) * ramp`` at every video token: c is the
  mean byte token of the row's caption / 100, ``ramp`` a fixed vector over the patch features.

  It depends on nothing else (not the latent, the time or the history), so a sampled unit is
  ``A + g B`` for the guided value g = ``guide(c_prompt, c_unconditional, w)``, A and B fixed by
  the seed.
  """

  def __init__(self, patch_dim: int):
    self.ramp = nnx.Param(jnp.linspace(0.5, 1.5, patch_dim))

  def _velocity(self, video, text):
    mask = text.segment_ids > 0
    c = jnp.sum(text.tokens * mask, axis=-1) / jnp.sum(mask, axis=-1) / 100.0
    return c[:, None, None] * self.ramp[...] * (video.segment_ids[..., None] > 0)

  def __call__(self, video, text):
    return self._velocity(video, text)

  def encode_context(self, video, text):
    del video
    return text

  def decode(self, video, context):
    return self._velocity(video, context)


def caption_value(text: str, length: int) -> float:
  """``c`` of `CaptionVelocity` for a caption, computed on the host."""
  return float(np.mean(text_lib.encode_caption(text, length))) / 100.0


@pytest.fixture(scope="module")
def stub_sampler():
  """`CaptionVelocity` as the model of a latent smoke run (3 channels, f_s = f_t = 2; its units
  are not clipped to [-1, 1] as pixels are, so they stay affine in the guided velocity)."""
  config = spec_lib.complete(sample_fixtures.smoke_config())
  config.model.prediction = "velocity"  # the model's output is the sampler's target
  config.data.features = "/features"    # never read: the VAE encodes and decodes, and the
  config.latent.channels = 3            # stand-in samples only latents here
  config.latent.spatial_compression = config.latent.temporal_compression = 2
  config.data.height = config.data.width = 64
  spec = spec_lib.resolve(config)
  graphdef, params = nnx.split(CaptionVelocity(spec.model.patch_dim), nnx.Param)
  return sample_lib.Sampler(spec, graphdef, params)


def test_negative_prompt_is_the_unconditional_branch_of_guidance(stub_sampler):
  """Guided velocity = uncond_neg + w (cond - uncond_neg): the videos of several (w, negative
  prompt) pairs lie on one line in the guided value g, at the g this formula gives."""
  length = stub_sampler.config.data.caption_length
  c = {text: caption_value(text, length) for text in ("a cat", "a dog", "")}

  def unit(prompt, w, negative=""):
    return stub_sampler.generate_units(prompt, num_frames=1, guidance_scale=w,
                                       negative_prompt=negative, seed=3, progress=False)[0, 0]

  base, one = unit("a cat", 0.0), unit("a cat", 1.0)  # g = c_null and c_cat
  response = (one - base) / (c["a cat"] - c[""])      # d unit / d g
  assert np.abs(response).max() > 0.1
  for w in (0.0, 3.0):
    g = sample_lib.guide(c["a cat"], c["a dog"], w)
    np.testing.assert_allclose(unit("a cat", w, "a dog"), base + (g - c[""]) * response,
                               atol=1e-5)
  # With w = 0 the output is the negative prompt's own conditional prediction.
  np.testing.assert_allclose(unit("a cat", 0.0, "a dog"), unit("a dog", 1.0), atol=1e-6)
  assert np.abs(unit("a cat", 0.0, "a dog") - base).max() > 1e-2


def test_guidance_decays_over_the_frame_units_as_the_official_sampler():
  """Pyramid Flow's ``use_linear_guidance``: max(guidance_scale - alpha i, min) for unit i."""
  assert sample_lib.unit_guidance_scales(4, 7.0, 5.0) == (7.0, 5.0, 5.0, 5.0)
  scales = sample_lib.unit_guidance_scales(16, 7.0, 5.0, 0.5, 2.0)
  assert scales == tuple(max(7.0 - 0.5 * i, 2.0) for i in range(16))
  assert scales[:3] == (7.0, 6.5, 6.0) and scales[-6:] == (2.0,) * 6


def test_each_frame_unit_is_guided_with_its_decayed_scale(stub_sampler):
  kwargs = dict(num_frames=5, seed=1, progress=False)
  zero = stub_sampler.generate_units("a cat", guidance_scale=0.0, video_guidance_scale=0.0,
                                     **kwargs)[0]
  one = stub_sampler.generate_units("a cat", guidance_scale=1.0, video_guidance_scale=1.0,
                                    **kwargs)[0]
  decayed = stub_sampler.generate_units("a cat", guidance_scale=3.0, video_guidance_scale=9.0,
                                        guidance_decay=0.75, min_guidance_scale=1.0, **kwargs)[0]
  for i, w in enumerate((3.0, 2.25, 1.5, 1.0, 1.0)):
    np.testing.assert_allclose(decayed[i], zero[i] + w * (one[i] - zero[i]), atol=2e-5)


# --- the smoke MM-DiT ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("sample_workdir"))
  sample_fixtures.write_workdir(sample_fixtures.smoke_config(), root)
  return root


@pytest.fixture(scope="module")
def sampler(workdir):
  return sample_lib.Sampler.from_workdir(workdir)


@pytest.fixture(scope="module")
def batch_units(sampler):
  """Two prompts (the second with a negative prompt), seeds 4 and 5, sampled as one batch."""
  return sampler.generate_units(PROMPTS, negative_prompt=NEGATIVE, num_frames=3, seed=4,
                                progress=False)


def test_a_batch_of_prompts_gives_the_videos_of_single_calls(sampler, batch_units):
  assert batch_units.shape == (2, 3, 32, 32, 3)
  for b, (prompt, negative) in enumerate(zip(PROMPTS, NEGATIVE)):
    single = sampler.generate_units(prompt, negative_prompt=negative, num_frames=3, seed=4 + b,
                                    progress=False)
    np.testing.assert_allclose(batch_units[b], single[0], atol=BATCH_TOLERANCE)
  assert np.abs(batch_units[0] - batch_units[1]).max() > 0.1  # two different videos


def test_a_continued_video_starts_with_the_given_frames(sampler):
  """The given frames come out unchanged, and the unit after them is the one the sampler draws
  with them as history: continuing a generated video's first two units gives its third."""
  units = sampler.generate_units(PROMPTS[0], num_frames=3, seed=2, progress=False)
  continued = sampler.generate_units(PROMPTS[0], video=units[0, :2], num_frames=3, seed=2,
                                     progress=False)
  np.testing.assert_array_equal(continued[:, :2], units[:, :2])
  np.testing.assert_allclose(continued[:, 2], units[:, 2], atol=1e-6)
  # uint8 frames of another size are cropped and resized as training frames are, and the unit
  # after them is drawn given them.
  rng = np.random.default_rng(0)
  clip = rng.integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)
  given = sampler.generate_units(PROMPTS[0], video=clip, num_frames=3, seed=2, progress=False)
  video = sampler.to_pixels(given[0])
  assert video.shape == (3, 32, 32, 3)
  for frame, out in zip(clip, video[:2]):
    np.testing.assert_array_equal(out, video_lib.fit_frame(frame, 32, 32))
  assert np.abs(given[0, 2] - units[0, 2]).max() > 1e-3


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_frames=0), "num_frames=0"),
    (dict(first_frame_steps=(1, 1)), "first_frame_steps"),
    (dict(guidance_scale=float("inf")), "guidance_scale=inf"),
    (dict(guidance_decay=-0.5), "guidance_decay=-0.5"),
    (dict(guidance_decay=float("nan")), "guidance_decay=nan"),
    (dict(min_guidance_scale=float("nan")), "min_guidance_scale=nan"),
    (dict(prompt=[]), "non-empty list of captions"),
    (dict(negative_prompt=["a", "b", "c"]), "negative_prompt=.*list of 2"),
    (dict(seed=[1]), "seed=.*list of 2"),
    (dict(seed=-1), "seed=-1"),
    (dict(image=np.zeros((8, 8, 3), np.uint8), video=np.zeros((1, 8, 8, 3), np.uint8)),
     "not both"),
    (dict(video=np.zeros((2, 32, 32), np.uint8)), r"\[N, H, W, 3\]"),
    (dict(video=np.zeros((3, 16, 16, 3), np.float32)), "model's size 64x64"),
    (dict(video=np.full((3, 64, 64, 3), 2.0, np.float32)), r"in \[-1, 1\]"),
    (dict(video=np.zeros((7, 64, 64, 3), np.uint8)), "4 frame units, more than num_frames=3"),
    (dict(video=[np.zeros((1, 8, 8, 3), np.uint8), np.zeros((2, 8, 8, 3), np.uint8)]),
     "one length"),
])
def test_bad_arguments_are_refused_before_sampling(stub_sampler, kwargs, message):
  kwargs = dict(dict(prompt=PROMPTS, num_frames=3, progress=False), **kwargs)
  with pytest.raises(sample_lib.SamplerArgumentError, match=message):
    stub_sampler.generate_units(kwargs.pop("prompt"), **kwargs)


def test_mode_mesh_and_output_errors_name_the_argument(stub_sampler):
  spec = spec_lib.resolve(sample_fixtures.smoke_config("tpdiff"))
  clip_sampler = sample_lib.Sampler(spec, stub_sampler._graphdef, stub_sampler._params)
  with pytest.raises(sample_lib.SamplerArgumentError, match="need an autoregressive run"):
    clip_sampler.generate_units("x", video=np.zeros((1, 8, 8, 3), np.uint8))
  with pytest.raises(sample_lib.SamplerArgumentError, match="guidance_decay=0.5: .*full_seq"):
    clip_sampler.generate_units("x", guidance_decay=0.5)
  with pytest.raises(sample_lib.SamplerArgumentError, match=r"1 \+ 2 k frames .*e\.g\. 3 or 5"):
    stub_sampler.generate_units("x", video=np.zeros((4, 64, 64, 3), np.uint8))
  with pytest.raises(sample_lib.SamplerArgumentError, match="--mesh"):
    sample_lib.sampling_mesh(stub_sampler.config, {"fsdp": 2})
  with pytest.raises(sample_lib.SamplerArgumentError, match="--mesh=fsdp:2"):
    sample_lib.parse_mesh("fsdp:2")
  assert sample_lib.parse_mesh("data=1, sequence=-1") == {"data": 1, "sequence": -1}
  assert sample_lib.output_frames("a.png", None) == 1 and sample_lib.output_frames("a.mp4", 5) == 5
  with pytest.raises(sample_lib.SamplerArgumentError, match="is one image: .*--num_frames=1"):
    sample_lib.output_frames("a.png", 3)
  assert sample_lib.output_paths("o.mp4", "w", 0, 2) == ["o_0.mp4", "o_1.mp4"]
  assert sample_lib.output_paths(None, "w", 3, 2) == ["w/samples/seed3.mp4", "w/samples/seed4.mp4"]


# --- the command --------------------------------------------------------------------------------


def _sample_command(workdir, *flags):
  result = subprocess.run([sys.executable, "-m", "pfm.sample", f"--workdir={workdir}", *flags],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout.split()


def test_text_to_image_writes_one_png_per_prompt(workdir, sampler, tmp_path):
  """``--output=*.png``: one frame unit per prompt (text-to-image), the images `generate` gives
  (PNG is lossless)."""
  outputs = _sample_command(workdir, *[f"--prompt={p}" for p in PROMPTS],
                            "--negative_prompt=blurry", f"--output={tmp_path / 'image.png'}")
  assert outputs == [str(tmp_path / "image_0.png"), str(tmp_path / "image_1.png")]
  images = sampler.generate(PROMPTS, negative_prompt="blurry", num_frames=1, progress=False)
  assert images.shape == (2, 1, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 1
  for path, image in zip(outputs, images):
    np.testing.assert_array_equal(video_lib.read_frames(path), image)


def test_sample_command_continues_a_video(workdir, tmp_path):
  clip = np.zeros((4, 32, 32, 3), np.uint8)
  clip[:, :, :16] = (200, 40, 40)
  video_lib.write_mp4(str(tmp_path / "in.mp4"), clip)
  given = video_lib.read_frames(str(tmp_path / "in.mp4"), num_frames=2)
  prompts = tmp_path / "prompts.txt"
  prompts.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
  outputs = _sample_command(workdir, f"--prompts_file={prompts}", f"--video={tmp_path / 'in.mp4'}",
                            "--video_frames=2", "--num_frames=3", "--guidance_decay=0.5",
                            f"--output={tmp_path / 'out.mp4'}")
  assert [os.path.basename(p) for p in outputs] == ["out_0.mp4", "out_1.mp4"]
  for path in outputs:
    frames = video_lib.read_frames(path)
    assert frames.shape == (3, 32, 32, 3)
    assert np.mean(np.abs(frames[:2].astype(int) - given)) < 8  # the given frames (lossy mp4)


# --- 8 devices ----------------------------------------------------------------------------------


def test_sharded_sampling_matches_one_device(workdir, batch_units, tmp_path):
  """The autoregressive smoke run, restored into FSDP x sequence x tensor shardings on 8 devices,
  samples the batch of `batch_units` as one device does.

  ``python -m tests.sample_layouts_check WORKDIR OUT.npy --tpdiff`` adds the full-sequence TPDiff
  smoke run (25 s more on 2 cores, so not in the suite).
  """
  output = tmp_path / "units.npy"
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="8")
  result = subprocess.run(
      [sys.executable, "-m", "tests.sample_layouts_check", workdir, str(output)], cwd=REPO,
      env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["num_devices"] == 8
  r = report["default"]
  assert r["mesh"] == dict(data=1, fsdp=2, sequence=2, tensor=2) and r["fully_sharded"], r
  assert r["param_share_per_device"] < 1.5 / 4, r  # the weights split fsdp x tensor = 4 ways
  np.testing.assert_allclose(np.load(output), batch_units, atol=SHARDED_TOLERANCE)
