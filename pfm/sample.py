r"""Sampling: ``python -m pfm.sample --workdir=runs/demo --prompt="..." [--image=first.png]``.

Two modes, as the run was trained (``config.mode``):

* autoregressive, with the temporal pyramid of Pyramidal Flow (Sec. 3.3, Eq. 17): frame unit after
  frame unit, each through all spatial stages (Algorithm 1). The history is the clean generated
  units at progressively lower resolution, laid out by the same code the training pipeline uses
  (``pfm.data.layout``). ``guidance_scale`` for the first frame, ``video_guidance_scale`` for
  later frames.
* full sequence: the whole clip at once through the stages of its pyramid (spatial, frame-rate
  (TPDiff Sec. 3.6) or both), Euler for flow matching and DDIM for the variance-preserving form,
  ``RunSpec.steps_per_stage`` steps per stage (``sample.steps_per_stage``, or
  ``sample.total_steps`` split as the partition splits the time axis). ``num_frames`` may exceed
  the training clip (TPDiff Appendix A.6).

Both run the pure samplers of ``pfm.pyramid.samplers`` with the MM-DiT as ``model_fn``.
Classifier-free guidance uses the null caption (BOS only).

The same options are available in Python, for notebooks::

  sampler = Sampler.from_workdir("runs/demo")
  frames = sampler.generate("a big fluffy grey cartoon rabbit ...", num_frames=16, seed=0)
  write_mp4("rabbit.mp4", frames)
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from pfm import batch as batch_lib
from pfm import checkpointing
from pfm import errors
from pfm import latent
from pfm import spec as spec_lib
from pfm import state as state_lib
from pfm.data import layout
from pfm.pyramid import tokens as tokens_lib
from pfm.data import text as text_lib
from pfm.data import video as video_lib
from pfm.pyramid import paths, samplers

FLAGS = flags.FLAGS


class SamplerArgumentError(errors.UserError, ValueError):
  """A sampling argument (frames, steps, guidance, image, output path) that cannot be used."""


class Sampler:
  """Text-to-video and text-conditioned image-to-video generation from a trained MM-DiT.

  Args:
    spec: the run spec (``pfm.spec.resolve`` of ``workdir/config.json``).
    graphdef: the model's ``nnx.GraphDef``.
    params: the parameters to sample with (the EMA parameters of a checkpoint).
  """

  def __init__(self, spec: spec_lib.RunSpec, graphdef, params):
    self.spec = spec
    self.config = spec.config
    self._graphdef = graphdef
    self._params = params
    self.mode = spec.mode
    self._pyramid = spec.pyramid
    self._min_noise = 1e-3  # the last step of the last stage lands on the clean prediction
    self._sample_unit = jax.jit(self._sample_unit_impl, static_argnames=("steps",))
    self._sample_clip = jax.jit(self._sample_clip_impl, static_argnames=("steps", "num_frames"))
    # Caption and history keys/values are reusable across Euler steps only when the caption is
    # not conditioned on the sampling time.
    self.caches_context = not spec.model.text_time_conditioning
    # Blockwise causal attention (Pyramidal Flow Sec. 3.3), or bidirectional over the history
    # and the current unit (the ablation of Fig. 11), where the history's activations depend
    # on the unit being generated and so are recomputed at every step.
    self.blockwise_causal = bool(self.config.model.blockwise_causal)
    self.compress_history = bool(self.config.pyramid.compress_history)
    # Corrective noise at the jump points (Eq. 15); off only for the ablation of Fig. 10. An
    # attribute, not a jit argument: set it before the first `generate`.
    self.renoise = bool(self.config.sample.renoise)
    # One frame unit as the tokens see it: pixels, or a latent frame of the run's VAE.
    self.frame_shape = spec.frame_shape
    self._vae = None           # latent runs: the VAE of config.latent.vae, loaded on first use
    self._text_encoders = None  # frozen caption encoders (text.encoder != "byte"), ditto

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None) -> "Sampler":
    """Loads ``workdir/config.json`` and the EMA parameters of a checkpoint.

    Without ``step``, the newest intact checkpoint: damaged ones (checksums, missing files,
    non-finite values) are skipped with a warning that names them. Nothing in the workdir is
    changed.

    Raises:
      pfm.errors.NotAWorkdirError: if the workdir has no ``config.json``.
      pfm.checkpointing.CheckpointError: if there is no intact checkpoint, or ``step`` is missing
        or damaged.
    """
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
      raise errors.NotAWorkdirError(f"{path} not found: is {workdir} a pfm.train workdir?")
    spec = spec_lib.resolve(ml_collections.ConfigDict(json.loads(path.read_text())))
    graphdef, abstract = state_lib.abstract_state(spec)
    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
      state, restored = checkpointer.restore(
          {"ema_params": abstract["ema_params"]}, step=step, partial=True)
    finally:
      checkpointer.close(check=False)
    logging.info("Sampling with the EMA parameters of checkpoint %d in %s", restored, workdir)
    return cls(spec, graphdef, state["ema_params"])

  # -- one frame unit through all stages ---------------------------------------------------------

  def _sample_unit_impl(self, params, key, history, frame_i, text, guidance_scale, *, steps):
    """Generates unit ``frame_i`` given per-stage padded history arrays; jitted per ``steps``.

    With a clean-conditioned caption (``model.text_time_conditioning = False``) the keys and
    values of the caption and the history are computed once per stage (``MMDiT.encode_context``)
    and every Euler step runs the current unit's tokens only (``MMDiT.decode``); otherwise each
    step runs the whole [caption; history; current unit] sequence. Without blockwise causal
    attention every token is in block 0 (the unit index stays the temporal RoPE position) and
    the whole sequence runs at every step.
    """
    cfg = self.config
    p = cfg.model.patch_size
    frame_shape = self.frame_shape
    model = nnx.merge(self._graphdef, params)
    both = lambda a: jnp.broadcast_to(a, (2, *a.shape))  # row 0 prompt, row 1 null caption
    causal = self.blockwise_causal
    caches_context = self.caches_context and causal
    # The clean history of each stage (t = 1), rows as the caption rows.
    history = [batch_lib.VideoTokens(
        tokens=both(h["tokens"]), t=jnp.ones((2, len(h["segment_ids"]))),
        segment_ids=both(h["segment_ids"]),
        causal_block=both(h["causal_block"] if causal else jnp.zeros_like(h["causal_block"])),
        positions=both(h["positions"]),
        temporal_positions=None if causal else both(h["causal_block"].astype(jnp.float32)))
        for h in history]
    if caches_context:
      contexts = [model.encode_context(h, text) for h in history]

    def model_fn(x, t, k):
      hk, wk, _ = self._pyramid.stage_shape(frame_shape, k)
      grid = tokens_lib.grid_positions((hk // p, wk // p), (hk // p, wk // p))
      current = batch_lib.VideoTokens(
          tokens=both(tokens_lib.patchify(x, p)), t=jnp.full((2, len(grid)), t),
          segment_ids=jnp.ones((2, len(grid)), jnp.int32),
          causal_block=jnp.full((2, len(grid)), frame_i if causal else 0, jnp.int32),
          positions=both(jnp.asarray(grid)),
          temporal_positions=None if causal else jnp.full((2, len(grid)), frame_i, jnp.float32))
      if caches_context:
        pred = model.decode(current, contexts[k])
      else:
        pred = model(current.concatenate(history[k]), text.at_time(t))
      n = len(grid)
      out_cond, out_null = pred[0, :n], pred[1, :n]
      # Guidance is linear in the output, and the output is affine in the target.
      out = tokens_lib.unpatchify(out_null + guidance_scale * (out_cond - out_null), p, hk, wk)
      return self._to_target(x, out, t, k)

    return samplers.sample_pyramid(model_fn, key, frame_shape, self._pyramid, steps,
                                   renoise=self.renoise)

  def _to_target(self, x, out, t, k):
    """The model's output at stage k as the sampler's target (velocity or eps_k)."""
    if self.config.model.prediction != "clean":
      return out
    s, e = self._pyramid.windows[k]
    return paths.target_from_clean(x, out, self._pyramid.clean_start(out, k), (t - s) / (e - s),
                                   s, e, self._pyramid.noise_schedule, self._min_noise)

  # -- a whole clip at once (full-sequence mode) -------------------------------------------------

  def _sample_clip_impl(self, params, key, text, guidance_scale, *, steps, num_frames):
    """Generates a ``num_frames`` clip through every stage of the pyramid; jitted per ``steps``.

    All frames are one unit (bidirectional attention). With a clean-conditioned caption the
    caption's keys/values are computed once for the whole clip (``MMDiT.encode_context``).
    """
    cfg = self.config
    p = cfg.model.patch_size
    pyramid = self._pyramid
    consistent = cfg.pyramid.stage_consistent_rope
    model = nnx.merge(self._graphdef, params)
    both = lambda a: jnp.broadcast_to(a, (2, *a.shape))  # row 0 prompt, row 1 null caption
    if self.caches_context:  # the caption plus one padding video token
      context = model.encode_context(batch_lib.VideoTokens(
          tokens=jnp.zeros((2, 1, self.frame_shape[2] * p * p)), t=jnp.ones((2, 1)),
          segment_ids=jnp.zeros((2, 1), jnp.int32), causal_block=jnp.zeros((2, 1), jnp.int32),
          positions=jnp.zeros((2, 1, 2))), text)

    def model_fn(x, t, k):
      tk, hk, wk, _ = x.shape
      per_frame = (hk // p) * (wk // p)
      n = tk * per_frame
      grid = tokens_lib.grid_positions((hk // p, wk // p), (hk // p, wk // p))
      current = batch_lib.VideoTokens(
          tokens=both(tokens_lib.patchify(x, p).reshape(n, -1)), t=jnp.full((2, n), t),
          segment_ids=jnp.ones((2, n), jnp.int32), causal_block=jnp.zeros((2, n), jnp.int32),
          positions=both(jnp.asarray(np.tile(grid, (tk, 1)))),
          temporal_positions=both(jnp.asarray(
              np.repeat(pyramid.temporal_positions(tk, k, consistent), per_frame))))
      if self.caches_context:
        pred = model.decode(current, context)
      else:
        pred = model(current, text.at_time(t))
      out = pred[1] + guidance_scale * (pred[0] - pred[1])
      out = tokens_lib.unpatchify(out.reshape(tk, per_frame, -1), p, hk, wk)
      return self._to_target(x, out, t, k)

    shape = (num_frames, *self.frame_shape)
    return samplers.sample_pyramid(model_fn, key, shape, pyramid, steps, renoise=self.renoise)

  def _history_arrays(self, history_frames: np.ndarray, length: int):
    """Per stage k: the clean history tokens padded to ``length - tokens(current unit at k)``."""
    cfg = self.config
    p, num_stages = cfg.model.patch_size, cfg.pyramid.num_stages
    out = []
    for k in range(num_stages):
      h = layout.layout_history(history_frames, k, self._pyramid, p,
                                compress=self.compress_history)
      grid = layout.level_token_grid(*self.frame_shape[:2], k, p)
      room = length - grid[0] * grid[1]
      n = h["tokens"].shape[0]
      if n > room:
        raise ValueError(f"history of {len(history_frames)} units needs {n} tokens, room {room}")
      pad = lambda a: np.concatenate([a, np.zeros((room - n, *a.shape[1:]), a.dtype)])
      out.append(dict(tokens=pad(h["tokens"]), causal_block=pad(h["causal_block"]),
                      positions=pad(h["positions"]),
                      segment_ids=pad(np.ones((n,), np.int32))))
    return tuple(out)

  def generate(self, prompt: str, *, num_frames: int | None = None,
               first_frame_steps=None, later_frame_steps=None,
               guidance_scale: float | None = None, video_guidance_scale: float | None = None,
               seed: int = 0, image: np.ndarray | None = None,
               progress: bool = True) -> np.ndarray:
    """Generates a video for ``prompt``.

    Args:
      prompt: the caption (UTF-8; the byte encoder reads the first
        ``config.data.caption_length - 1`` bytes, cut at a character boundary, with a warning when
        it is longer; frozen encoders read ``config.text.max_length`` tokens).
      num_frames: frame units to generate (may exceed the training clip length; in the
        full-sequence mode a multiple of the coarsest stage's frame-rate reduction). A latent
        run's unit is a latent frame: ``1 + f_t (num_frames - 1)`` pixel frames come out.
      first_frame_steps, later_frame_steps: steps per stage, coarsest first (autoregressive);
        ``first_frame_steps`` also sets the steps per stage of the full-sequence mode (default
        ``RunSpec.steps_per_stage``).
      guidance_scale, video_guidance_scale: classifier-free guidance for the first / later units
        (the full-sequence mode uses ``guidance_scale``).
      seed: sampling seed; the same seed gives the same video.
      image: optional first frame (uint8 ``[H, W, 3]`` at the model's resolution, or any size,
        which is centre-cropped and resized) for image-to-video (autoregressive mode); a latent
        run encodes it with the VAE as the first (image) latent frame.
      progress: show a progress bar.

    Returns:
      uint8 ``[T, H, W, 3]`` pixels, ``T = spec.pixel_frames(num_frames)``: a latent run's
      latents decoded by the VAE (in causal chunks of ``config.latent.decode_window`` latent
      frames).

    Raises:
      SamplerArgumentError: (a ``ValueError``) for ``num_frames < 1``, step lists that do not give
        >= 1 step to each stage, a non-finite guidance scale, an image in the full-sequence mode,
        or a frame count the pyramid does not divide.
    """
    s = self.config.sample
    num_frames = s.num_frames if num_frames is None else num_frames
    self._check_arguments(num_frames, first_frame_steps, later_frame_steps, guidance_scale,
                          video_guidance_scale)
    if self.mode == "full_sequence":
      return self._generate_clip(prompt, num_frames, first_frame_steps, guidance_scale, seed,
                                 image)
    first_frame_steps = tuple(first_frame_steps or self.spec.first_frame_steps)
    later_frame_steps = tuple(later_frame_steps or self.spec.later_frame_steps)
    guidance_scale = s.guidance_scale if guidance_scale is None else guidance_scale
    video_guidance_scale = (s.video_guidance_scale if video_guidance_scale is None
                            else video_guidance_scale)
    cfg = self.config
    length = layout.max_tokens_per_sample(
        num_frames, height=self.frame_shape[0], width=self.frame_shape[1],
        patch_size=cfg.model.patch_size, num_stages=cfg.pyramid.num_stages,
        compress_history=self.compress_history)
    length = -(-length // 64) * 64  # a few padded lengths, so few compilations
    text = self.caption(prompt)

    frames = []
    if image is not None:
      frames.append(self._first_unit(image))
    key = jax.random.key(seed)
    for i in tqdm(range(len(frames), num_frames), desc="frame units", disable=not progress):
      history = (np.stack(frames) if frames
                 else np.zeros((0, *self.frame_shape), np.float32))
      first = i == 0
      x = self._sample_unit(
          self._params, jax.random.fold_in(key, i), self._history_arrays(history, length),
          jnp.int32(i), text,
          jnp.float32(guidance_scale if first else video_guidance_scale),
          steps=first_frame_steps if first else later_frame_steps)
      frames.append(np.asarray(x if self.spec.latent else jnp.clip(x, -1.0, 1.0)))
    return self.to_pixels(np.stack(frames))

  # -- the latent space --------------------------------------------------------------------------

  @property
  def vae(self):
    """The VAE of a latent run (``config.latent.vae``, a ``pfm.train_vae`` workdir).

    Raises:
      pfm.errors.NotAWorkdirError: if ``config.latent.vae`` is not a VAE workdir.
    """
    if self._vae is None:
      if not self.config.latent.vae:
        raise errors.NotAWorkdirError("config.latent.vae is empty: a latent run needs its VAE "
                                      "workdir to decode (pass --config.latent.vae=DIR)")
      self._vae = latent.load_vae(self.config.latent.vae)
    return self._vae

  def to_pixels(self, units: np.ndarray) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` of generated frame units ``[N, h, w, C]``: pixels in [-1, 1], or
    normalised latents, which the VAE denormalises and decodes."""
    if not self.spec.latent:
      return video_lib.to_uint8(units)
    vae = self.vae
    window = self.config.latent.decode_window or None
    pixels = vae.decode(vae.denormalize(jnp.asarray(units)[None]), window=window)[0]
    return video_lib.to_uint8(np.asarray(jnp.clip(pixels, -1.0, 1.0)))

  def _first_unit(self, image: np.ndarray) -> np.ndarray:
    """The first frame unit of image-to-video: the frame in [-1, 1], or its normalised VAE
    latent (posterior mean), [h, w, C]."""
    cfg = self.config
    frame = video_lib.to_float(video_lib.fit_frame(image, cfg.data.height, cfg.data.width))
    if not self.spec.latent:
      return frame
    vae = self.vae
    latent = vae.normalize(vae.encode(jnp.asarray(frame)[None, None]).mean)
    return np.asarray(latent[0, 0])

  def _check_arguments(self, num_frames, first_frame_steps, later_frame_steps, guidance_scale,
                       video_guidance_scale) -> None:
    """Raises `SamplerArgumentError` naming the argument that cannot be sampled with."""
    num_stages = self._pyramid.num_stages
    if int(num_frames) != num_frames or num_frames < 1:
      raise SamplerArgumentError(f"num_frames={num_frames}: need a whole number >= 1")
    for name, steps in (("first_frame_steps", first_frame_steps),
                        ("later_frame_steps", later_frame_steps)):
      if steps is not None and (len(steps) != num_stages or min(steps) < 1):
        raise SamplerArgumentError(f"{name}={tuple(steps)}: need >= 1 step for each of the "
                                   f"{num_stages} stages, coarsest first")
    for name, scale in (("guidance_scale", guidance_scale),
                        ("video_guidance_scale", video_guidance_scale)):
      if scale is not None and not np.isfinite(scale):
        raise SamplerArgumentError(f"{name}={scale}: need a finite number")

  def caption(self, prompt: str) -> batch_lib.TextTokens:
    """The MM-DiT's caption input for ``prompt``: row 0 the prompt, row 1 the null caption (BOS
    only for bytes; one token of zero features for frozen encoders, as caption dropout trains
    it, ``pfm.objective``)."""
    if self.config.text.encoder != "byte":
      return self._caption_features(prompt)
    text_len = self.config.data.caption_length
    if not text_lib.caption_fits(prompt, text_len):
      logging.warning(
          "The prompt has %d UTF-8 bytes; the model reads the first %d (config.data."
          "caption_length %d, BOS included), cut at a character boundary: %r",
          len(prompt.encode("utf-8")), text_len - 1, text_len,
          text_lib.decode_caption(text_lib.encode_caption(prompt, text_len)))
    cond = text_lib.encode_caption(prompt, text_len)
    null = text_lib.encode_caption("", text_len)
    text_tokens = np.zeros((2, text_len), np.int32)
    text_tokens[0, :len(cond)], text_tokens[1, :len(null)] = cond, null
    segment_ids = (text_tokens > 0).astype(np.int32)
    return batch_lib.TextTokens(segment_ids=jnp.asarray(segment_ids),
                                t=jnp.ones(text_tokens.shape), tokens=jnp.asarray(text_tokens))

  def _caption_features(self, prompt: str) -> batch_lib.TextTokens:
    """Frozen-encoder caption features of ``prompt`` and the null caption (see `caption`)."""
    if self._text_encoders is None:  # loaded on first use: byte-caption runs never need them
      self._text_encoders = latent.CaptionEncoder.from_config(self.config)
    features = self._text_encoders([prompt])[0]
    embeddings = features["text_embeddings"]
    n, length = len(embeddings), self.config.text.max_length
    rows = np.zeros((2, length, embeddings.shape[-1]), np.float32)
    rows[0, :n] = embeddings
    segment_ids = np.zeros((2, length), np.int32)
    segment_ids[0, :n], segment_ids[1, 0] = 1, 1
    pooled = None
    if "pooled" in features:
      pooled = np.zeros((2, length, len(features["pooled"])), np.float32)
      pooled[0] = features["pooled"]
      pooled = jnp.asarray(pooled)
    return batch_lib.TextTokens(segment_ids=jnp.asarray(segment_ids), t=jnp.ones((2, length)),
                                embeddings=jnp.asarray(rows), pooled=pooled)

  def _generate_clip(self, prompt, num_frames, steps, guidance_scale, seed, image):
    if image is not None:
      raise SamplerArgumentError("image-to-video needs an autoregressive run; this one is "
                                 "full_sequence")
    coarsest = self._pyramid.temporal_factors[-1]
    if num_frames % coarsest:
      raise SamplerArgumentError(f"num_frames={num_frames} is not divisible by the coarsest "
                                 f"stage's frame-rate reduction {coarsest}")
    s = self.config.sample
    steps = tuple(steps or self.spec.steps_per_stage)
    guidance_scale = s.guidance_scale if guidance_scale is None else guidance_scale
    x = self._sample_clip(self._params, jax.random.key(seed), self.caption(prompt),
                          jnp.float32(guidance_scale), steps=steps, num_frames=num_frames)
    return self.to_pixels(np.asarray(x if self.spec.latent else jnp.clip(x, -1.0, 1.0)))


def check_writable(path: str) -> None:
  """Makes sure a file can be written at ``path`` before anything is generated.

  Creates the parent folder and writes and removes an empty probe file there (local paths; a
  remote ``gs://`` path is only checked when written).

  Raises:
    SamplerArgumentError: naming the path and the cause (a parent that is a file, a read-only
      folder, an existing folder at ``path``).
  """
  if "://" in path:
    return
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if os.path.exists(parent) and not os.path.isdir(parent):
    raise SamplerArgumentError(f"cannot write --output={path}: {parent} is a file, not a folder")
  if os.path.isdir(path):
    raise SamplerArgumentError(f"--output={path} is a folder; give a file name (.mp4)")
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.probe"), "wb") as f:
      probe = f.name
    os.remove(probe)
  except OSError as e:
    raise SamplerArgumentError(f"cannot write --output={path}: {e.strerror or e}") from None


def main(argv):
  del argv
  errors.quiet_library_tracebacks()
  output = FLAGS.output or os.path.join(FLAGS.workdir, "samples", f"seed{FLAGS.seed}.mp4")
  check_writable(output)  # before minutes of sampling, not after
  try:
    image = video_lib.read_image(FLAGS.image) if FLAGS.image else None
  except video_lib.VideoReadError as e:
    raise SamplerArgumentError(f"--image: {e}") from None
  try:
    steps = {name: FLAGS[name].value and [int(v) for v in FLAGS[name].value]
             for name in ("first_frame_steps", "later_frame_steps")}
  except ValueError:
    raise SamplerArgumentError("--first_frame_steps / --later_frame_steps: need comma-separated "
                               "whole numbers, e.g. 20,20,20") from None
  sampler = Sampler.from_workdir(FLAGS.workdir, FLAGS.step)
  frames = sampler.generate(
      FLAGS.prompt, num_frames=FLAGS.num_frames,
      **steps, guidance_scale=FLAGS.guidance_scale,
      video_guidance_scale=FLAGS.video_guidance_scale, seed=FLAGS.seed, image=image)
  video_lib.write_mp4(output, frames)
  print(output)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A pfm.train workdir (config.json + checkpoints).")
  flags.DEFINE_string("prompt", None, "The caption to generate.")
  flags.DEFINE_string("image", None, "Optional first frame (png/jpg) for image-to-video.")
  flags.DEFINE_integer("num_frames", None, "Frame units to generate (default: config).")
  flags.DEFINE_list("first_frame_steps", None,
                    "Steps per stage for the first frame (full-sequence mode: for the clip).")
  flags.DEFINE_list("later_frame_steps", None, "Euler steps per stage for later frames.")
  flags.DEFINE_float("guidance_scale", None, "Guidance scale for the first frame.")
  flags.DEFINE_float("video_guidance_scale", None, "Guidance scale for later frames.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_string("output", None, "Output mp4 path (default: workdir/samples/seed<N>.mp4).")
  flags.mark_flags_as_required(["workdir", "prompt"])
  app.run(errors.exit_on_user_error(main, "pfm.sample"))
