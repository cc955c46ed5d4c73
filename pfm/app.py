r"""A web page for sampling: ``python -m pfm.app --workdir=runs/demo`` (then open the address).

Text-to-video and image-to-video (autoregressive runs) from a ``pfm.train`` workdir, in a Gradio
page: a prompt, an optional first frame, the options of `pfm.sample.Sampler.generate`, a progress
bar over frame units (the sampler's own tqdm bar, tracked by ``gr.Progress``) and the generated mp4
in a video player. The sampler is loaded once at start-up; one video is generated at a time and
further requests wait in the queue. Every video is kept as ``--output_dir/<time>-seed<N>.mp4``
(default ``WORKDIR/samples/app``).

Needs the ``app`` extra: ``pip install -e ".[app]"``.

    python -m pfm.app --workdir=runs/demo --port=7860 [--step=N] [--host=0.0.0.0]

In Python (a notebook), `build_app` makes the page from any `Sampler` and `launch` serves it::

  sampler = Sampler.from_workdir("runs/demo")
  launch(build_app(sampler, output_dir="/tmp/videos"), output_dir="/tmp/videos", block=False)

An argument the sampler cannot use (an empty prompt, a first frame for a full-sequence run, a
frame count or step list it refuses) is shown in the page as an error message.
"""

from __future__ import annotations

import dataclasses
import logging as pylogging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags, logging
import gradio as gr
import numpy as np

from pfm import errors
from pfm import sample as sample_lib
from pfm.data import video as video_lib

FLAGS = flags.FLAGS

# System fonts only: the page needs nothing from outside the server (clusters, no network).
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])


class AppArgumentError(errors.UserError, ValueError):
  """A command-line argument of ``pfm.app`` (host, port, output folder) that cannot be used."""


# -- the sampling options ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplingOption:
  """One keyword argument of `Sampler.generate` as a control in the page.

  To offer a new sampler argument (a negative prompt, say), add one entry to `sampling_options`.

  Attributes:
    keyword: the ``Sampler.generate`` argument it sets.
    control: makes the control with the run's default (called inside the ``gr.Blocks`` context,
      with the keywords ``visible`` and ``elem_id``, which is ``keyword``).
    parse: the control's value -> the argument; raises `pfm.sample.SamplerArgumentError` with a
      message for the page.
    modes: the run modes (``spec.mode``) that use it; it is hidden, and its argument left out,
      in the others.
  """

  keyword: str
  control: Callable[..., gr.components.Component]
  parse: Callable[[Any], Any]
  modes: tuple[str, ...] = ("autoregressive", "full_sequence")


def _shown(value) -> str:
  """A control's value as the page showed it (``2`` for ``2.0``)."""
  return format(value, "g") if isinstance(value, (int, float)) else repr(value)


def _whole_number(label: str, minimum: int) -> Callable[[Any], int]:
  """A parser: a number that is whole and >= ``minimum`` -> int."""

  def parse(value):
    if value is None or not np.isfinite(value) or value != int(value) or value < minimum:
      raise sample_lib.SamplerArgumentError(
          f"{label}: {_shown(value)}: need a whole number >= {minimum}")
    return int(value)

  return parse


def _finite_number(label: str) -> Callable[[Any], float]:
  """A parser: a finite number -> float."""

  def parse(value):
    if value is None or not np.isfinite(value):
      raise sample_lib.SamplerArgumentError(f"{label}: {_shown(value)}: need a finite number")
    return float(value)

  return parse


def _steps_per_stage(label: str, num_stages: int) -> Callable[[str], tuple[int, ...]]:
  """A parser: ``"20, 10, 10"`` -> ``(20, 10, 10)``, one whole number >= 1 per stage."""

  def parse(text):
    try:
      steps = tuple(int(v) for v in str(text).replace(",", " ").split())
    except ValueError:
      steps = ()
    if len(steps) != num_stages or min(steps) < 1:
      raise sample_lib.SamplerArgumentError(
          f"{label}: {text!r}: need {num_stages} whole numbers >= 1 separated by commas, one per "
          "stage, coarsest first (e.g. " + ", ".join(["10"] * num_stages) + ")")
    return steps

  return parse


def _steps_text(steps: Sequence[int]) -> str:
  return ", ".join(str(int(n)) for n in steps)


def sampling_options(sampler: sample_lib.Sampler) -> list[SamplingOption]:
  """The options of ``Sampler.generate`` offered in the page, with the run's defaults.

  Args:
    sampler: the sampler the page serves (its ``spec`` gives the defaults and the stage count).

  Returns:
    the options in page order; those ``sampler.mode`` does not use are included (hidden).
  """
  spec, s = sampler.spec, sampler.config.sample
  k = spec.num_stages
  autoregressive = spec.mode == "autoregressive"
  units = "Number of frame units" + (" (latent frames)" if spec.latent else "")
  first_steps = spec.first_frame_steps if autoregressive else spec.steps_per_stage
  first_label = "Steps per stage, first frame" if autoregressive else "Steps per stage"
  later_label = "Steps per stage, later frames"
  guidance_label = "Guidance scale" + (", first frame" if autoregressive else "")
  video_guidance_label = "Video guidance scale, later frames"
  per_stage = f"{k} whole numbers, coarsest stage first"

  def scale(value, label, **kw):
    return gr.Slider(0.0, max(15.0, 2 * value), value=value, step=0.5, label=label,
                     info="classifier-free guidance; 1 is none", **kw)

  return [
      SamplingOption(
          "num_frames",
          lambda **kw: gr.Number(
              s.num_frames, label=units, precision=None, step=1,
              info=f"trained on clips of {sampler.config.data.num_frames}", **kw),
          _whole_number(units, 1)),
      SamplingOption(
          "first_frame_steps",
          lambda **kw: gr.Textbox(_steps_text(first_steps), label=first_label, info=per_stage,
                                  max_lines=1, **kw),
          _steps_per_stage(first_label, k)),
      SamplingOption(
          "later_frame_steps",
          lambda **kw: gr.Textbox(_steps_text(spec.later_frame_steps), label=later_label,
                                  info=per_stage, max_lines=1, **kw),
          _steps_per_stage(later_label, k), modes=("autoregressive",)),
      SamplingOption(
          "guidance_scale", lambda **kw: scale(s.guidance_scale, guidance_label, **kw),
          _finite_number(guidance_label)),
      SamplingOption(
          "video_guidance_scale",
          lambda **kw: scale(s.video_guidance_scale, video_guidance_label, **kw),
          _finite_number(video_guidance_label), modes=("autoregressive",)),
      SamplingOption(
          "seed",
          lambda **kw: gr.Number(0, label="Seed", precision=None, step=1,
                                 info="the same seed gives the same video", **kw),
          _whole_number("Seed", 0)),
  ]


# -- the page ------------------------------------------------------------------------------------


def _new_video_path(output_dir: str, seed: int) -> str:
  """``output_dir/<YYYYmmdd-HHMMSS>-seed<N>[-i].mp4``, a name not taken yet."""
  stem = os.path.join(output_dir, f"{time.strftime('%Y%m%d-%H%M%S')}-seed{seed}")
  path, i = stem + ".mp4", 1
  while os.path.exists(path):
    path, i = f"{stem}-{i}.mp4", i + 1
  return path


def make_generate_fn(sampler: sample_lib.Sampler, options: Sequence[SamplingOption], *,
                     output_dir: str, fps: int = 8) -> Callable:
  """The page's sampling function: ``(prompt, image, *option values) -> (mp4 path, status)``.

  Runs ``sampler.generate`` with its tqdm bar over frame units (which the page tracks as its
  progress bar) and writes the video with `pfm.data.video.write_mp4`.

  Args:
    sampler: the sampler.
    options: the `SamplingOption` list whose control values follow the prompt and the image.
    output_dir: local folder for the mp4 files (made if missing).
    fps: frame rate of the written video, frames per second.

  Returns:
    the function. It takes the prompt (str), the first frame (uint8 ``[H, W, 3]`` of any size,
    or None) and one value per option, and returns the path of the new mp4 and a Markdown line
    about it (frames, size, duration, sampling time, path).

  Raises (from the function):
    gr.Error: shown in the page, for an empty prompt or an argument the sampler refuses (any
      `pfm.errors.UserError`, e.g. a first frame for a full-sequence run).
  """
  mode = sampler.spec.mode

  def generate(prompt, image, *values):
    try:
      if not (prompt or "").strip():
        raise sample_lib.SamplerArgumentError("the prompt is empty: write a caption for the video")
      kwargs = {o.keyword: o.parse(v) for o, v in zip(options, values, strict=True)
                if mode in o.modes}
      start = time.perf_counter()
      frames = sampler.generate(prompt, image=image, progress=True, **kwargs)
    except errors.UserError as e:
      logging.warning("Not sampled: %s", e)
      raise gr.Error(str(e), print_exception=False) from None
    seconds = time.perf_counter() - start
    os.makedirs(output_dir, exist_ok=True)
    path = _new_video_path(output_dir, kwargs.get("seed", 0))
    video_lib.write_mp4(path, frames, fps=fps)
    t, h, w, _ = frames.shape
    status = (f"{t} frames of {w}x{h} pixels at {fps} fps ({t / fps:.2f} s), sampled in "
              f"{seconds:.1f} s; saved as `{path}`")
    logging.info("%r: %s", prompt, status)
    return path, status

  return generate


def run_description(sampler: sample_lib.Sampler) -> str:
  """One line about the run (Markdown): what it generates, its frame size and stages."""
  spec, c = sampler.spec, sampler.config
  kind = ("text-to-video and image-to-video, frame unit by frame unit"
          if spec.mode == "autoregressive" else "text-to-video, the whole clip at once")
  latent = f", in the latent space of `{c.latent.vae}`" if spec.latent else ""
  return (f"{kind}; {c.data.width}x{c.data.height} pixels, {spec.num_stages} "
          f"stage{'s' if spec.num_stages > 1 else ''}{latent}")


def build_app(sampler: sample_lib.Sampler, *, output_dir: str, fps: int = 8,
              title: str = "pfm", description: str = "") -> gr.Blocks:
  """The sampling page of ``sampler`` as a ``gr.Blocks`` app (not launched; see `launch`).

  Controls: the prompt, an optional first frame (image-to-video), the `sampling_options`, a
  Generate button (Enter in the prompt box too); outputs: the video (``elem_id="video"``) and a
  status line (``elem_id="status"``).

  Args:
    sampler: the sampler, e.g. ``Sampler.from_workdir(workdir)``.
    output_dir: local folder for the generated mp4 files; pass it to `launch` as well.
    fps: frame rate of the written videos, frames per second.
    title: the page's heading and browser tab title.
    description: Markdown shown under the heading (e.g. the workdir and checkpoint).

  Returns:
    the app, with its queue set to one generation at a time.
  """
  options = sampling_options(sampler)
  mode = sampler.spec.mode
  # Gradio's copies of the videos and uploads: removed hourly once a day old.
  with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
    gr.Markdown(f"# {title}\n{description}\n\n{run_description(sampler)}")
    with gr.Row(equal_height=True):
      prompt = gr.Textbox(label="Prompt", lines=2, max_lines=4, scale=5, elem_id="prompt",
                          placeholder="a big fluffy grey cartoon rabbit climbs out of his burrow")
      button = gr.Button("Generate", variant="primary", scale=1, elem_id="generate")
    with gr.Row(equal_height=True):
      image = gr.Image(
          label="First frame (optional): image-to-video" + (
              "" if mode == "autoregressive" else "; needs an autoregressive run"),
          type="numpy", image_mode="RGB", sources=["upload", "clipboard"], height=320,
          elem_id="image")
      with gr.Column():
        video = gr.Video(label="Video", interactive=False, autoplay=True, loop=True, height=320,
                         elem_id="video")
        status = gr.Markdown(elem_id="status")
    with gr.Accordion("Sampling options", open=True):
      controls = []
      for i in range(0, len(options), 3):  # three a row
        with gr.Row():
          controls += [o.control(visible=mode in o.modes, elem_id=o.keyword)
                       for o in options[i:i + 3]]
    inputs = [prompt, image, *controls]
    generate = make_generate_fn(sampler, options, output_dir=output_dir, fps=fps)

    # Gradio passes a set of inputs as one dict, so `progress` is the function's second
    # positional parameter, where gradio looks for it (and tracks tqdm bars through it).
    def on_generate(values, progress=gr.Progress(track_tqdm=True)):
      del progress
      return generate(*(values[c] for c in inputs))

    gr.on([button.click, prompt.submit], on_generate, inputs=set(inputs),
          outputs=[video, status], concurrency_limit=1, api_name="generate")
  demo.queue(default_concurrency_limit=1)
  return demo


def launch(demo: gr.Blocks, *, output_dir: str, host: str = "127.0.0.1", port: int = 7860,
           block: bool = True) -> str:
  """Serves ``demo`` at ``http://host:port`` with the page's theme and its videos' folder.

  Args:
    demo: the app of `build_app`.
    output_dir: the folder the app writes videos to (the server may send files from it).
    host: address to listen on (``0.0.0.0``: every interface).
    port: TCP port.
    block: wait until interrupted (Ctrl-C), then close the server; False returns at once with
      the server running in a thread (``demo.close()`` stops it).

  Returns:
    the page's local address.

  Raises:
    AppArgumentError: if the server cannot listen at ``host:port``.
  """
  try:
    _, url, _ = demo.launch(server_name=host, server_port=port, allowed_paths=[output_dir],
                            theme=THEME, show_error=True, prevent_thread_lock=True,
                            quiet=not block)
  except OSError as e:
    raise AppArgumentError(f"cannot serve at --host={host} --port={port}: {e}") from None
  if block:
    demo.block_thread()
  return url


def check_address(host: str, port: int) -> None:
  """Makes sure ``host:port`` can be listened on, before the sampler is loaded.

  Raises:
    AppArgumentError: naming the address and the cause (a port in use, an unknown host).
  """
  if not 0 < port < 65536:
    raise AppArgumentError(f"--port={port}: need a TCP port from 1 to 65535")
  try:
    with socket.create_server((host, port)):
      pass
  except OSError as e:
    cause = os.strerror(e.errno) if (e.errno or 0) > 0 else (e.strerror or str(e))
    raise AppArgumentError(f"cannot serve at --host={host} --port={port}: {cause}") from None


def default_output_dir(workdir: str) -> str:
  """``workdir/samples/app`` for a local workdir; a new temporary folder for a remote one."""
  if "://" in workdir:
    return tempfile.mkdtemp(prefix="pfm-app-")
  return os.path.join(os.path.abspath(workdir), "samples", "app")


def workdir_description(workdir: str, step: int | None, output_dir: str) -> str:
  """The page's line about where it samples from and writes to (Markdown)."""
  checkpoint = "the newest checkpoint" if step is None else f"checkpoint {step}"
  return f"`{workdir}`, {checkpoint}; videos are saved in `{output_dir}`"


def main(argv):
  del argv
  errors.quiet_library_tracebacks()
  pylogging.getLogger("httpx").setLevel(pylogging.WARNING)  # gradio's requests to itself
  check_address(FLAGS.host, FLAGS.port)  # before minutes of loading, not after
  if FLAGS.fps < 1:
    raise AppArgumentError(f"--fps={FLAGS.fps}: need a whole number >= 1")
  output_dir = FLAGS.output_dir or default_output_dir(FLAGS.workdir)
  if "://" in output_dir:
    raise AppArgumentError(f"--output_dir={output_dir}: need a local folder (the page's videos "
                           "are sent from there)")
  output_dir = os.path.abspath(output_dir)
  try:
    os.makedirs(output_dir, exist_ok=True)
  except OSError as e:
    raise AppArgumentError(f"cannot write --output_dir={output_dir}: {e.strerror or e}") from None
  sampler = sample_lib.Sampler.from_workdir(FLAGS.workdir, FLAGS.step)
  demo = build_app(sampler, output_dir=output_dir, fps=FLAGS.fps,
                   description=workdir_description(FLAGS.workdir, FLAGS.step, output_dir))
  launch(demo, output_dir=output_dir, host=FLAGS.host, port=FLAGS.port)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A pfm.train workdir (config.json + checkpoints).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest intact one).")
  flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
  flags.DEFINE_integer("port", 7860, "TCP port to listen on.")
  flags.DEFINE_string("output_dir", None, "Folder for the generated mp4 files (default: "
                      "workdir/samples/app; a temporary folder for a remote workdir).")
  flags.DEFINE_integer("fps", 8, "Frame rate of the written videos, frames per second.")
  flags.mark_flags_as_required(["workdir"])
  app.run(errors.exit_on_user_error(main, "pfm.app"))
