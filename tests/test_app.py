"""The sampling page (``python -m pfm.app``) in headless Chromium, on an untrained smoke model.

The workdir is the smoke config and one checkpoint of random parameters (no training). The page
is served in this process and driven with Playwright through Debian's Chromium
(``/usr/bin/chromium``; the browser tests are skipped without it).
``PFM_APP_SCREENSHOT=docs/app.png`` also writes a screenshot of the page after a video was
generated (how docs/app.png is made).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import av
import gradio as gr
import jax
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import sync_playwright

from configs import default
from pfm import app as app_lib
from pfm import checkpointing
from pfm import sample as sample_lib
from pfm import spec as spec_lib
from pfm import state as state_lib
from pfm.data import video as video_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
PROMPT = "a big fluffy grey cartoon rabbit climbs out of his burrow on a grassy hill"
FAST = {"#num_frames input": "2", "#first_frame_steps input": "1, 1, 1",
        "#later_frame_steps input": "1, 1, 1"}  # 2 frame units, 1 Euler step per stage
TIMEOUT_MS = 180_000  # a first generation compiles the sampler


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
  """A ``pfm.train`` workdir of the smoke config: config.json and checkpoint 0 of random values.

  Every array of the train state is drawn at once on the host (no initialiser to compile); the
  random parameters make a video of coloured noise.
  """
  workdir = tmp_path_factory.mktemp("workdir")
  spec = spec_lib.resolve(default.get_config("smoke"))
  _, abstract = state_lib.abstract_state(spec)
  rng = np.random.default_rng(0)

  def value(a):
    if np.issubdtype(a.dtype, np.floating):
      return (0.05 * rng.standard_normal(a.shape)).astype(a.dtype)
    return np.zeros(a.shape, a.dtype)

  (workdir / "config.json").write_text(spec.config.to_json_best_effort(indent=2))
  checkpointer = checkpointing.Checkpointer(str(workdir / "checkpoints"))
  checkpointer.save(0, jax.tree.map(value, abstract), force=True)
  checkpointer.close()
  return str(workdir)


@pytest.fixture(scope="module")
def server(workdir, tmp_path_factory):
  """``(page address, output folder, sampler)`` of the app served in this process."""
  output_dir = str(tmp_path_factory.mktemp("videos"))
  with pytest.MonkeyPatch.context() as env:  # gradio's copies of the videos, uploads
    env.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
    sampler = sample_lib.Sampler.from_workdir(workdir)
    demo = app_lib.build_app(
        sampler, output_dir=output_dir,
        description=app_lib.workdir_description(workdir, None, output_dir))
    url = app_lib.launch(demo, output_dir=output_dir, port=free_port(), block=False)
    yield url, output_dir, sampler
    demo.close(verbose=False)


@pytest.fixture(scope="module")
def browser():
  if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); .ci/run installs it")
  with sync_playwright() as playwright:
    browser = playwright.chromium.launch(
        executable_path=CHROMIUM, args=["--autoplay-policy=no-user-gesture-required"])
    yield browser
    browser.close()


@pytest.fixture
def page(browser, server):
  page = browser.new_page(viewport={"width": 1100, "height": 860})
  page.set_default_timeout(30_000)
  page.goto(server[0])
  page.wait_for_selector("#prompt textarea")
  yield page
  page.close()


def _fill(page, prompt: str, fields: dict[str, str]) -> None:
  page.fill("#prompt textarea", prompt)
  for selector, value in fields.items():
    page.fill(selector, value)


def _generated_video(page) -> dict:
  """Waits for the page's video, plays it, and reports what the browser's decoder saw."""
  page.wait_for_selector("#video video[src]", timeout=TIMEOUT_MS)
  return page.eval_on_selector("#video video", """async (v) => {
    v.muted = true;
    await v.play();
    // A frame presented by the player, with its media time: the video really plays.
    const mediaTime = await Promise.race([
        new Promise(done => v.requestVideoFrameCallback((now, frame) => done(frame.mediaTime))),
        new Promise(done => setTimeout(() => done(null), 10000))]);
    return {src: v.src, readyState: v.readyState, duration: v.duration, error: v.error,
            width: v.videoWidth, height: v.videoHeight, mediaTime, paused: v.paused};
  }""")


def _decode(path: str) -> np.ndarray:
  with av.open(path) as container:
    return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _new_video(output_dir: str, before: set[str]) -> str:
  new = sorted(set(os.listdir(output_dir)) - before)
  assert len(new) == 1 and new[0].endswith(".mp4"), new
  return os.path.join(output_dir, new[0])


def test_text_to_video_plays_in_the_browser(page, server):
  _, output_dir, sampler = server
  height, width = sampler.config.data.height, sampler.config.data.width
  before = set(os.listdir(output_dir))
  _fill(page, PROMPT, FAST)
  page.click("#generate")
  # The sampler's tqdm bar over frame units is the page's progress bar while it compiles.
  page.locator("#video").get_by_text("frame units").wait_for(timeout=TIMEOUT_MS)
  played = _generated_video(page)
  assert played["error"] is None and played["readyState"] >= 2 and not played["paused"]
  assert played["duration"] == pytest.approx(2 / 8, abs=0.05)  # 2 frames at 8 fps
  assert (played["width"], played["height"]) == (width, height)
  assert played["mediaTime"] is not None, "no frame was presented in 10 s"
  path = _new_video(output_dir, before)
  assert played["src"].endswith("/" + os.path.basename(path))
  frames = _decode(path)
  assert frames.shape == (2, height, width, 3) and frames.std() > 1
  assert f"2 frames of {width}x{height} pixels" in page.inner_text("#status")
  if os.environ.get("PFM_APP_SCREENSHOT"):  # e.g. docs/app.png, in 256 colours
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=os.environ["PFM_APP_SCREENSHOT"], full_page=True)
    with Image.open(os.environ["PFM_APP_SCREENSHOT"]) as shot:
      shot.convert("RGB").quantize(256).save(os.environ["PFM_APP_SCREENSHOT"], optimize=True)


def test_image_to_video_starts_from_the_uploaded_frame(page, server, tmp_path):
  _, output_dir, sampler = server
  height, width = sampler.config.data.height, sampler.config.data.width
  y, x = np.mgrid[0:48, 0:40]  # another size and aspect: centre-cropped and resized
  first = np.stack([x * 6, y * 5, np.full_like(x, 128)], -1).astype(np.uint8)
  Image.fromarray(first).save(tmp_path / "first.png")
  before = set(os.listdir(output_dir))
  page.set_input_files("#image input[type=file]", str(tmp_path / "first.png"))
  page.wait_for_selector("#image img")
  _fill(page, PROMPT, FAST)
  page.click("#generate")
  played = _generated_video(page)
  assert played["error"] is None and played["readyState"] >= 2
  frames = _decode(_new_video(output_dir, before))
  assert frames.shape == (2, height, width, 3)
  expected = video_lib.fit_frame(first, height, width).astype(int)
  assert np.abs(frames[0].astype(int) - expected).mean() < 6  # H.264, 4:2:0


@pytest.mark.parametrize("prompt,fields,message", [
    ("", {}, "the prompt is empty"),
    (PROMPT, {"#first_frame_steps input": "1, x"}, "need 3 whole numbers >= 1"),
    (PROMPT, {"#num_frames input": "0"}, "Number of frame units: 0: need a whole number >= 1"),
])
def test_bad_input_shows_an_error_in_the_page(page, server, prompt, fields, message):
  output_dir = server[1]
  before = set(os.listdir(output_dir))
  _fill(page, prompt, fields)
  page.click("#generate")
  page.get_by_text(message).wait_for()
  assert set(os.listdir(output_dir)) == before


def test_a_full_sequence_run_refuses_a_first_frame(tmp_path):
  """Without a browser: the page's sampling function on a full-sequence smoke model."""
  config = default.get_config("smoke")
  config.mode = "full_sequence"
  spec = spec_lib.resolve(config)
  graphdef, abstract = state_lib.abstract_state(spec)
  params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract["ema_params"])
  sampler = sample_lib.Sampler(spec, graphdef, params)
  options = app_lib.sampling_options(sampler)
  shown = [o.keyword for o in options if spec.mode in o.modes]
  assert shown == ["num_frames", "first_frame_steps", "guidance_scale", "seed"]
  generate = app_lib.make_generate_fn(sampler, options, output_dir=str(tmp_path))
  values = [4, "1, 1, 1", "", 4.0, 2.0, 0]  # the hidden options' values are left out
  with pytest.raises(gr.Error, match="image-to-video .* an autoregressive run"):
    generate(PROMPT, np.zeros((32, 32, 3), np.uint8), *values)
  with pytest.raises(gr.Error, match="Seed: 1.5: need a whole number"):
    generate(PROMPT, None, *values[:-1], 1.5)
  assert not os.listdir(tmp_path)


def test_the_command_reports_a_bad_workdir_or_port_in_one_line(tmp_path):
  with pytest.raises(app_lib.AppArgumentError, match="cannot serve at .*--port"):
    with socket.socket() as taken:
      taken.bind(("127.0.0.1", 0))
      taken.listen()
      app_lib.check_address("127.0.0.1", taken.getsockname()[1])
  result = subprocess.run(
      [sys.executable, "-m", "pfm.app", f"--workdir={tmp_path}", f"--port={free_port()}"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1, result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f"pfm.app: error: {tmp_path}/config.json not found: is {tmp_path} a pfm.train workdir?")
