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

Options (those of Pyramid Flow's released sampler, ``generate`` / ``generate_i2v``):

* negative prompt: the unconditional branch of classifier-free guidance reads the negative
  prompt's caption instead of the null caption (BOS only; ``negative_prompt=""``, the default);
* guidance decaying over the frame units: unit i is guided with
  ``max(guidance_scale - guidance_decay * i, min_guidance_scale)`` (the official
  ``use_linear_guidance`` with ``alpha = guidance_decay``; off at ``guidance_decay=0``);
* several prompts at once: a list of B prompts is sampled as one batch (2B model rows: the
  prompts, then their unconditional captions), prompt b with seed ``seed + b``, the same videos
  as B single calls with those seeds;
* continuing a video: ``video=`` (or ``image=``, one frame) is the start of the clip; its frames
  are the first units of the history (a latent run encodes them with the VAE) and the sampler
  generates the units after them;
* text-to-image: ``num_frames=1`` is one frame unit, the first frame of the image-model stage.

Devices: the sampler works on a `jax.sharding.Mesh` with the run's mesh axes and logical-axis
rules (``config.mesh``, ``pfm.parallel``), as the training step does: the MM-DiT's parameters are
split by their logical names (``embed`` over ``fsdp``, heads and MLP units over ``tensor``), the
rows of [prompts; unconditional captions] over ``data`` x ``fsdp`` and the video tokens over
``sequence`` (attention stays exact). ``Sampler.from_workdir`` restores the EMA parameters
straight into those shardings; the VAE of a latent run is restored the same way (its conv kernels
carry ``embed`` / ``mlp`` names) and decodes in causal chunks (``config.latent.decode_window``).
A different mesh for sampling (e.g. all devices on ``sequence`` for one long video) is one
argument: ``mesh={"data": 1, "sequence": -1}``, ``--mesh=data=1,sequence=-1``.

The same options are available in Python, for notebooks::

  sampler = Sampler.from_workdir("runs/demo")
  frames = sampler.generate("a big fluffy grey cartoon rabbit ...", num_frames=16, seed=0)
  write_mp4("rabbit.mp4", frames)
  videos = sampler.generate(["a rabbit", "a bird"], negative_prompt="blurry, low quality")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import contextlib
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
from pfm import distributed
from pfm import errors
from pfm import latent
from pfm import parallel
from pfm import spec as spec_lib
from pfm import state as state_lib
from pfm.data import layout
from pfm.pyramid import tokens as tokens_lib
from pfm.data import text as text_lib
from pfm.data import video as video_lib
from pfm.pyramid import paths, samplers

FLAGS = flags.FLAGS

# The official sampler's floor for the decaying guidance (``min_guidance_scale``).
MIN_GUIDANCE_SCALE = 2.0


class SamplerArgumentError(errors.UserError, ValueError):
  """A sampling argument (frames, steps, guidance, prompts, image or video, output path, mesh)
  that cannot be used."""


def sampling_mesh(config: ml_collections.ConfigDict,
                  sizes: Mapping[str, int] | None = None,
                  devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The mesh to sample on: the run's ``config.mesh`` with ``sizes`` in place of some axes.

  Args:
    config: the run config (its ``mesh`` section; a config without one is data parallel).
    sizes: ``{mesh axis: size}`` overrides, e.g. ``{"data": 1, "sequence": -1}`` (-1: the
      devices left over); axes not named keep the config's size.
    devices: default all devices of all processes.

  Returns:
    a `jax.sharding.Mesh` with the axes `pfm.parallel.MESH_AXES`.

  Raises:
    SamplerArgumentError: for an unknown axis, or sizes that do not fit the devices (a run
      trained on 8 devices sampled on 1 names ``--mesh``).
  """
  axes = dict(config.get("mesh", None) or {})
  for axis, size in (sizes or {}).items():
    if axis not in parallel.MESH_AXES:
      raise SamplerArgumentError(f"mesh axis {axis!r}: use one of {parallel.MESH_AXES}")
    axes[axis] = int(size)
  try:
    return parallel.create_mesh({"mesh": axes}, devices)
  except ValueError as e:
    count = len(devices) if devices is not None else jax.device_count()
    raise SamplerArgumentError(
        f"{e}; choose the sampling mesh for these {count} devices with --mesh (Python: "
        "mesh=...), e.g. --mesh=data=-1,fsdp=1,sequence=1,tensor=1") from None


def parse_mesh(text: str) -> dict[str, int]:
  """``"data=1,sequence=-1"`` -> ``{"data": 1, "sequence": -1}`` (the ``--mesh`` flag).

  Raises:
    SamplerArgumentError: for an entry that is not ``axis=size`` with a mesh axis and a whole
      number.
  """
  sizes = {}
  for entry in filter(None, (e.strip() for e in text.split(","))):
    axis, _, size = entry.partition("=")
    try:
      if axis.strip() not in parallel.MESH_AXES:
        raise ValueError
      sizes[axis.strip()] = int(size)
    except ValueError:
      raise SamplerArgumentError(
          f"--mesh={text}: need comma-separated axis=size entries over {parallel.MESH_AXES}, "
          "e.g. data=1,sequence=-1") from None
  return sizes


def unit_guidance_scales(num_units: int, guidance_scale: float, video_guidance_scale: float,
                         guidance_decay: float = 0.0,
                         min_guidance_scale: float = MIN_GUIDANCE_SCALE) -> tuple[float, ...]:
  """The classifier-free guidance scale of each frame unit of an autoregressive video.

  Without decay (``guidance_decay = 0``): ``guidance_scale`` for unit 0 (the first frame) and
  ``video_guidance_scale`` for every later unit. With ``guidance_decay = alpha > 0``, Pyramid
  Flow's linear guidance (``use_linear_guidance`` of its ``generate`` and ``generate_i2v``):
  unit i, counted from the start of the video (a given image or clip included), gets
  ``max(guidance_scale - alpha * i, min_guidance_scale)``, and ``video_guidance_scale`` is not
  used.

  Returns:
    ``num_units`` floats.
  """
  if guidance_decay > 0:
    return tuple(max(guidance_scale - guidance_decay * i, min_guidance_scale)
                 for i in range(num_units))
  return tuple(guidance_scale if i == 0 else video_guidance_scale for i in range(num_units))


def guide(out_cond: jax.Array, out_uncond: jax.Array, guidance_scale) -> jax.Array:
  """Classifier-free guidance: ``uncond + w (cond - uncond)`` (Ho & Salimans, 2022).

  The unconditional output is the model's output for the null caption or the negative prompt.
  Guidance is linear in the output, and the output is affine in the target, so it applies to a
  clean prediction as it does to a velocity or an epsilon. Shapes broadcast; float32.
  """
  return out_uncond + guidance_scale * (out_cond - out_uncond)


def _prompt_list(prompt: str | Sequence[str]) -> list[str]:
  prompts = [prompt] if isinstance(prompt, str) else list(prompt)
  if not prompts or not all(isinstance(p, str) for p in prompts):
    raise SamplerArgumentError(f"prompt={prompt!r}: need a caption or a non-empty list of "
                               "captions")
  return prompts


def _per_prompt(value: str | Sequence[str], count: int, name: str) -> list[str]:
  """One string for every prompt, or one per prompt."""
  values = [value] * count if isinstance(value, str) else list(value)
  if len(values) != count or not all(isinstance(v, str) for v in values):
    raise SamplerArgumentError(f"{name}={value!r}: need one caption for every prompt, or a list "
                               f"of {count} (one per prompt)")
  return values


def _seed_list(seed: int | Sequence[int], count: int) -> list[int]:
  """``seed + b`` for prompt b, or the given per-prompt seeds."""
  seeds = [seed + b for b in range(count)] if np.ndim(seed) == 0 else list(seed)
  if len(seeds) != count or not all(isinstance(s, (int, np.integer)) and 0 <= s < 2**32
                                    for s in seeds):
    raise SamplerArgumentError(f"seed={seed!r}: need a whole number in [0, 2^32) (prompt b "
                               f"samples with seed + b) or a list of {count} of them")
  return [int(s) for s in seeds]


def _host(x: jax.Array) -> np.ndarray:
  """A replicated device array as a host array (on any process)."""
  return np.asarray(x.addressable_data(0))


class Sampler:
  """Text-to-video, text-to-image and video continuation from a trained MM-DiT.

  Args:
    spec: the run spec (``pfm.spec.resolve`` of ``workdir/config.json``).
    graphdef: the model's ``nnx.GraphDef``.
    params: the parameters to sample with (the EMA parameters of a checkpoint), on any devices;
      they are laid out on ``mesh`` by their logical axis names.
    mesh: the devices to sample on: a `jax.sharding.Mesh` with the axes of
      `pfm.parallel.MESH_AXES`, ``{axis: size}`` overrides of ``config.mesh`` (`sampling_mesh`),
      or None for ``config.mesh`` over all devices.

  Raises:
    SamplerArgumentError: if the mesh does not fit the devices.
  """

  def __init__(self, spec: spec_lib.RunSpec, graphdef, params,
               mesh: jax.sharding.Mesh | Mapping[str, int] | None = None):
    self.spec = spec
    self.config = spec.config
    self.mesh = mesh if isinstance(mesh, jax.sharding.Mesh) else sampling_mesh(spec.config, mesh)
    self.rules = parallel.logical_rules(self.config)
    self._graphdef = graphdef
    self._params = jax.device_put(params, parallel.named_shardings(params, self.mesh, self.rules))
    self.mode = spec.mode
    self._pyramid = spec.pyramid
    self._min_noise = 1e-3  # the last step of the last stage lands on the clean prediction
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self._replicated = replicated
    self._sample_unit = jax.jit(self._sample_unit_impl, static_argnames=("steps",),
                                out_shardings=replicated)
    self._sample_clip = jax.jit(self._sample_clip_impl, static_argnames=("steps", "num_frames"),
                                out_shardings=replicated)
    # Caption and history keys/values are reusable across Euler steps only when the caption is
    # not conditioned on the sampling time, each token is conditioned on its own time (not its
    # sample's), and there are no single-stream blocks (whose text stream reads the video).
    self.caches_context = (not spec.model.text_time_conditioning
                           and spec.model.conditioning == "token"
                           and not spec.model.single_blocks)
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
  def from_workdir(cls, workdir: str, step: int | None = None, *,
                   mesh: jax.sharding.Mesh | Mapping[str, int] | None = None) -> "Sampler":
    """Loads ``workdir/config.json`` and the EMA parameters of a checkpoint.

    The parameters are restored straight into their shardings on the sampling mesh (``mesh``,
    as in `Sampler`): no device holds more of them than the mesh and rules give it. Without
    ``step``, the newest intact checkpoint: damaged ones (checksums, missing files, non-finite
    values) are skipped with a warning that names them. Nothing in the workdir is changed. A LoRA
    workdir's adapters are merged into the base weights they were trained on (``pfm.lora``).

    Raises:
      pfm.errors.NotAWorkdirError: if the workdir has no ``config.json``.
      pfm.checkpointing.CheckpointError: if there is no intact checkpoint, or ``step`` is missing
        or damaged.
      SamplerArgumentError: if the mesh does not fit the devices.
    """
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
      raise errors.NotAWorkdirError(f"{path} not found: is {workdir} a pfm.train workdir?")
    spec = spec_lib.resolve(ml_collections.ConfigDict(json.loads(path.read_text())))
    if not isinstance(mesh, jax.sharding.Mesh):
      mesh = sampling_mesh(spec.config, mesh)
    graphdef, abstract = state_lib.abstract_state(spec)
    shardings = parallel.named_shardings(abstract["ema_params"], mesh,
                                         parallel.logical_rules(spec.config))
    target = {"ema_params": state_lib.sharded_abstract_state(abstract["ema_params"], shardings)}
    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
      state, restored = checkpointer.restore(target, step=step, partial=True)
    finally:
      checkpointer.close(check=False)
    logging.info("Sampling with the EMA parameters of checkpoint %d in %s on mesh %s", restored,
                 workdir, dict(mesh.shape))
    params = state["ema_params"]
    if spec.lora is not None:  # LoRA adapters: merged into the base weights they were trained on
      base, _ = state_lib.read_lora_base(
          spec, checkpointer.restored_extra.get(state_lib.LORA_BASE_STEP), mesh=mesh)
      graphdef, params = state_lib.merge_lora(spec, base, params)
    return cls(spec, graphdef, params, mesh=mesh)

  # -- devices -----------------------------------------------------------------------------------

  def on_mesh(self) -> contextlib.AbstractContextManager:
    """The sampler's mesh and logical-axis rules as the current ones (activation constraints)."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nnx.logical_axis_rules(self.rules))
    return stack

  def _replicate(self, tree):
    """Host arrays (the same on every process) as arrays replicated on the mesh."""
    def put(x):
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, self._replicated, lambda index: x[index])
    return jax.tree.map(put, tree)

  # -- one frame unit through all stages ---------------------------------------------------------

  def _sample_unit_impl(self, params, key_data, history, frame_i, text, guidance_scale, *,
                        steps):
    """Generates unit ``frame_i`` of B videos at once; jitted per ``steps``.

    ``key_data``: uint32 [B, 2], each video's base key (unit i folds in i); ``history``: per
    stage the padded clean history tokens of each video, [B, room, ...]; ``text``: 2B caption
    rows, the prompts then their unconditional captions. Returns the unit, [B, h, w, C].

    With a clean-conditioned caption (``model.text_time_conditioning = False``) the keys and
    values of the caption and the history are computed once per stage (``MMDiT.encode_context``)
    and every Euler step runs the current unit's tokens only (``MMDiT.decode``); otherwise each
    step runs the whole [caption; history; current unit] sequence. Without blockwise causal
    attention every token is in block 0 (the unit index stays the temporal RoPE position) and
    the whole sequence runs at every step.
    """
    cfg = self.config
    p = cfg.model.patch_size
    model = nnx.merge(self._graphdef, params)
    rows = text.segment_ids.shape[0]
    b = rows // 2
    both = lambda a: jnp.concatenate([a, a])  # [B, ...] -> rows: prompts, then unconditional
    causal = self.blockwise_causal
    caches_context = self.caches_context and causal
    # The clean history of each stage (t = 1), rows as the caption rows.
    history = [batch_lib.VideoTokens(
        tokens=both(h["tokens"]), t=jnp.ones((rows, h["segment_ids"].shape[1])),
        segment_ids=both(h["segment_ids"]),
        causal_block=both(h["causal_block"] if causal else jnp.zeros_like(h["causal_block"])),
        positions=both(h["positions"]),
        temporal_positions=None if causal else both(h["causal_block"].astype(jnp.float32)))
        for h in history]
    if caches_context:
      contexts = [model.encode_context(h, text) for h in history]

    def model_fn(x, t, k):
      _, hk, wk, _ = x.shape
      grid = tokens_lib.grid_positions((hk // p, wk // p), (hk // p, wk // p))
      n = len(grid)
      model_t = self._pyramid.model_time(t, k)  # the time the model reads at t (stage k)
      current = batch_lib.VideoTokens(
          tokens=both(tokens_lib.patchify(x, p)), t=jnp.full((rows, n), model_t),
          segment_ids=jnp.ones((rows, n), jnp.int32),
          causal_block=jnp.full((rows, n), frame_i if causal else 0, jnp.int32),
          positions=jnp.broadcast_to(jnp.asarray(grid), (rows, n, 2)),
          temporal_positions=None if causal else jnp.full((rows, n), frame_i, jnp.float32))
      if caches_context:
        pred = model.decode(current, contexts[k])
      else:
        pred = model(current.concatenate(history[k]), text.at_time(model_t))
      out = guide(pred[:b, :n], pred[b:, :n], guidance_scale)
      return self._to_target(x, tokens_lib.unpatchify(out, p, hk, wk), t, k)

    keys = jax.vmap(lambda key: jax.random.fold_in(key, frame_i))(
        jax.random.wrap_key_data(key_data))
    return samplers.sample_pyramid_batch(model_fn, keys, self.frame_shape, self._pyramid, steps,
                                         renoise=self.renoise, time_grid=cfg.sample.time_grid)

  def _to_target(self, x, out, t, k):
    """The model's output at stage k as the sampler's target (velocity or eps_k)."""
    if self.config.model.prediction != "clean":
      return out
    s, e = self._pyramid.windows[k]
    return paths.target_from_clean(x, out, self._pyramid.clean_start(out, k), (t - s) / (e - s),
                                   s, e, self._pyramid.noise_schedule, self._min_noise)

  # -- a whole clip at once (full-sequence mode) -------------------------------------------------

  def _sample_clip_impl(self, params, key_data, text, guidance_scale, *, steps, num_frames):
    """Generates B ``num_frames`` clips through every stage of the pyramid; jitted per ``steps``.

    All frames are one unit (bidirectional attention). With a clean-conditioned caption the
    caption's keys/values are computed once for the whole clip (``MMDiT.encode_context``).
    Arguments as `_sample_unit_impl`; returns [B, num_frames, h, w, C].
    """
    cfg = self.config
    p = cfg.model.patch_size
    pyramid = self._pyramid
    consistent = cfg.pyramid.stage_consistent_rope
    model = nnx.merge(self._graphdef, params)
    rows = text.segment_ids.shape[0]
    b = rows // 2
    both = lambda a: jnp.concatenate([a, a])  # [B, ...] -> rows: prompts, then unconditional
    if self.caches_context:  # the caption plus one padding video token
      context = model.encode_context(batch_lib.VideoTokens(
          tokens=jnp.zeros((rows, 1, self.frame_shape[2] * p * p)), t=jnp.ones((rows, 1)),
          segment_ids=jnp.zeros((rows, 1), jnp.int32),
          causal_block=jnp.zeros((rows, 1), jnp.int32), positions=jnp.zeros((rows, 1, 2))), text)

    def model_fn(x, t, k):
      _, tk, hk, wk, _ = x.shape
      per_frame = (hk // p) * (wk // p)
      n = tk * per_frame
      grid = tokens_lib.grid_positions((hk // p, wk // p), (hk // p, wk // p))
      model_t = pyramid.model_time(t, k)
      current = batch_lib.VideoTokens(
          tokens=both(tokens_lib.patchify(x, p).reshape(b, n, -1)),
          t=jnp.full((rows, n), model_t),
          segment_ids=jnp.ones((rows, n), jnp.int32), causal_block=jnp.zeros((rows, n), jnp.int32),
          positions=jnp.broadcast_to(jnp.asarray(np.tile(grid, (tk, 1))), (rows, n, 2)),
          temporal_positions=jnp.broadcast_to(jnp.asarray(
              np.repeat(pyramid.temporal_positions(tk, k, consistent), per_frame)), (rows, n)))
      if self.caches_context:
        pred = model.decode(current, context)
      else:
        pred = model(current, text.at_time(model_t))
      out = guide(pred[:b], pred[b:], guidance_scale)
      out = tokens_lib.unpatchify(out.reshape(b, tk, per_frame, -1), p, hk, wk)
      return self._to_target(x, out, t, k)

    shape = (num_frames, *self.frame_shape)
    return samplers.sample_pyramid_batch(model_fn, jax.random.wrap_key_data(key_data), shape,
                                         pyramid, steps, renoise=self.renoise,
                                         time_grid=cfg.sample.time_grid)

  def _history_arrays(self, history_frames: np.ndarray, length: int):
    """Per stage k: the clean history tokens of B videos ``[B, i, h, w, C]``, each padded to
    ``length - tokens(current unit at k)``: dicts of [B, room, ...] arrays."""
    cfg = self.config
    p, num_stages = cfg.model.patch_size, cfg.pyramid.num_stages
    out = []
    for k in range(num_stages):
      per_video = [layout.layout_history(h, k, self._pyramid, p, compress=self.compress_history)
                   for h in history_frames]
      grid = layout.level_token_grid(*self.frame_shape[:2], k, p)
      room = length - grid[0] * grid[1]
      n = per_video[0]["tokens"].shape[0]
      if n > room:
        raise ValueError(f"history of {history_frames.shape[1]} units needs {n} tokens, room "
                         f"{room}")
      pad = lambda a: np.concatenate([a, np.zeros((room - n, *a.shape[1:]), a.dtype)])
      stack = lambda name: np.stack([pad(h[name]) for h in per_video])
      out.append(dict(tokens=stack("tokens"), causal_block=stack("causal_block"),
                      positions=stack("positions"),
                      segment_ids=np.broadcast_to(pad(np.ones((n,), np.int32)),
                                                  (len(per_video), room))))
    return tuple(out)

  def generate(self, prompt: str | Sequence[str], **kwargs) -> np.ndarray:
    """Generates a video for ``prompt``, or a batch of videos for a list of prompts.

    Args:
      prompt: the caption, or a list of B captions sampled as one batch.
      **kwargs: the options of `generate_units` (frames, steps, guidance, negative prompt,
        seed, image or video to continue, progress).

    Returns:
      uint8 ``[T, H, W, 3]`` pixels for one caption, ``[B, T, H, W, 3]`` for a list;
      ``T = spec.pixel_frames(num_frames)``: a latent run's latents decoded by the VAE (in causal
      chunks of ``config.latent.decode_window`` latent frames).

    Raises:
      SamplerArgumentError: see `generate_units`.
    """
    videos = self.to_pixels(self.generate_units(prompt, **kwargs))
    return videos[0] if isinstance(prompt, str) else videos

  def generate_units(self, prompt: str | Sequence[str], *, num_frames: int | None = None,
                     first_frame_steps=None, later_frame_steps=None,
                     guidance_scale: float | None = None,
                     video_guidance_scale: float | None = None,
                     negative_prompt: str | Sequence[str] | None = None,
                     guidance_decay: float = 0.0,
                     min_guidance_scale: float = MIN_GUIDANCE_SCALE,
                     seed: int | Sequence[int] = 0, image: np.ndarray | None = None,
                     video: np.ndarray | Sequence[np.ndarray] | None = None,
                     progress: bool = True) -> np.ndarray:
    """Generates the frame units of a batch of videos, before the VAE.

    Args:
      prompt: the caption, or a list of B captions (UTF-8; the byte encoder reads the first
        ``config.data.caption_length - 1`` bytes, cut at a character boundary, with a warning when
        one is longer; frozen encoders read ``config.text.max_length`` tokens). A list runs as
        one batch: every Euler step is one model call on 2B rows.
      num_frames: frame units per video, a given image or clip included (may exceed the training
        clip length; in the full-sequence mode a multiple of the coarsest stage's frame-rate
        reduction; 1 is text-to-image). A latent run's unit is a latent frame: ``1 + f_t
        (num_frames - 1)`` pixel frames come out of the VAE.
      first_frame_steps, later_frame_steps: steps per stage, coarsest first (autoregressive);
        ``first_frame_steps`` also sets the steps per stage of the full-sequence mode (default
        ``RunSpec.steps_per_stage``).
      guidance_scale, video_guidance_scale: classifier-free guidance for the first / later units
        (the full-sequence mode uses ``guidance_scale``); default ``config.sample``.
      negative_prompt: the caption of the unconditional branch of guidance, one for every prompt
        or a list of B; ``""`` is the null caption the model was trained with (caption dropout);
        None: ``config.sample.negative_prompt`` (the released models' default negative prompt).
      guidance_decay: alpha >= 0 of the decaying guidance over frame units
        (`unit_guidance_scales`); 0 (default) keeps the two fixed scales. Autoregressive mode.
      min_guidance_scale: the floor of the decaying guidance (official default 2).
      seed: sampling seed of the first prompt; prompt b samples with ``seed + b`` (or a list of
        B seeds). A video depends on its seed only, not on the other prompts of the batch.
      image: optional first frame, uint8 ``[H, W, 3]`` (any size: centre-cropped and resized as
        the training frames are): image-to-video, a clip of one frame (autoregressive mode).
      video: optional start of the video to continue (autoregressive mode): uint8 pixel frames
        ``[N, H, W, 3]`` of any size (centre-cropped and resized), or float32 ``[N, H, W, 3]`` in
        [-1, 1] at the model's size (e.g. the units of an earlier call in a pixel run); one clip
        for every prompt, or a list of B clips of one length. They become the first units of
        the history: a pixel run's N frames are N units; a latent run encodes them with the VAE
        (posterior mean) into ``1 + (N - 1) / f_t`` latent units, N = 1 + f_t k.
      progress: show a progress bar.

    Returns:
      float32 ``[B, num_frames, h, w, C]``: pixels in [-1, 1] (the given frames first,
      unchanged), or a latent run's normalised latents.

    Raises:
      SamplerArgumentError: (a ``ValueError``) before anything is compiled, for
        ``num_frames < 1``, step lists that do not give >= 1 step to each stage, a non-finite
        guidance scale, a negative or non-finite guidance decay, no prompt, negative prompts or
        seeds that do not match the prompts, both ``image`` and ``video``, a clip that is not
        ``[N, H, W, 3]`` (or, in a latent run, not ``1 + f_t k`` frames) or longer than
        ``num_frames`` units, an image, a video or a guidance decay in the full-sequence mode, or
        a frame count the pyramid does not divide.
    """
    prompts = _prompt_list(prompt)
    if negative_prompt is None:
      negative_prompt = self.config.sample.negative_prompt
    negatives = _per_prompt(negative_prompt, len(prompts), "negative_prompt")
    seeds = _seed_list(seed, len(prompts))
    s = self.config.sample
    num_frames = s.num_frames if num_frames is None else num_frames
    self._check_arguments(num_frames, first_frame_steps, later_frame_steps, guidance_scale,
                          video_guidance_scale, guidance_decay, min_guidance_scale)
    if image is not None and video is not None:
      raise SamplerArgumentError("give image= (a first frame) or video= (a clip), not both")
    if image is not None:
      image = np.asarray(image)
      if image.ndim != 3:
        raise SamplerArgumentError(f"image: need one frame [H, W, 3], got shape {image.shape}")
      video = image[None]
    guidance_scale = s.guidance_scale if guidance_scale is None else guidance_scale
    key_data = np.stack([jax.random.key_data(jax.random.key(seed)) for seed in seeds])
    if self.mode == "full_sequence":
      if video is not None:
        raise SamplerArgumentError("image-to-video and video continuation need an "
                                   "autoregressive run; this one is full_sequence")
      if guidance_decay:
        raise SamplerArgumentError(f"guidance_decay={guidance_decay}: the guidance decays over "
                                   "the frame units of an autoregressive run; this one is "
                                   "full_sequence (one unit)")
      return self._generate_clip(prompts, negatives, key_data, num_frames, first_frame_steps,
                                 guidance_scale)
    clips = self._conditioning_clips(video, len(prompts), num_frames)
    first_frame_steps = tuple(first_frame_steps or self.spec.first_frame_steps)
    later_frame_steps = tuple(later_frame_steps or self.spec.later_frame_steps)
    video_guidance_scale = (s.video_guidance_scale if video_guidance_scale is None
                            else video_guidance_scale)
    scales = unit_guidance_scales(num_frames, guidance_scale, video_guidance_scale,
                                  guidance_decay, min_guidance_scale)
    cfg = self.config
    length = layout.max_tokens_per_sample(
        num_frames, height=self.frame_shape[0], width=self.frame_shape[1],
        patch_size=cfg.model.patch_size, num_stages=cfg.pyramid.num_stages,
        compress_history=self.compress_history)
    length = -(-length // 64) * 64  # a few padded lengths, so few compilations
    units = self.conditioning_units(clips) if clips is not None else np.zeros(
        (len(prompts), 0, *self.frame_shape), np.float32)
    text = self._replicate(self.caption(prompts, negatives))
    key_data = self._replicate(key_data)
    frames = list(np.swapaxes(units, 0, 1))  # units of [B, h, w, C]
    with self.on_mesh():
      for i in tqdm(range(len(frames), num_frames), desc="frame units", disable=not progress):
        history = (np.stack(frames, axis=1) if frames
                   else np.zeros((len(prompts), 0, *self.frame_shape), np.float32))
        first = i == 0
        x = _host(self._sample_unit(
            self._params, key_data, self._replicate(self._history_arrays(history, length)),
            self._replicate(np.int32(i)), text, self._replicate(np.float32(scales[i])),
            steps=first_frame_steps if first else later_frame_steps))
        frames.append(x if self.spec.latent else np.clip(x, -1.0, 1.0))
    return np.stack(frames, axis=1)

  # -- the latent space --------------------------------------------------------------------------

  @property
  def vae(self):
    """The VAE of a latent run (``config.latent.vae``, a ``pfm.train_vae`` workdir), restored
    into the shardings of its logical axis names on the sampler's mesh.

    Raises:
      pfm.errors.NotAWorkdirError: if ``config.latent.vae`` is not a VAE workdir.
    """
    if self._vae is None:
      if not self.config.latent.vae:
        raise errors.NotAWorkdirError("config.latent.vae is empty: a latent run needs its VAE "
                                      "workdir to decode (pass --config.latent.vae=DIR)")
      self._vae = latent.load_vae(self.config.latent.vae, mesh=self.mesh, rules=self.rules)
    return self._vae

  def to_pixels(self, units: np.ndarray) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` of generated frame units ``[N, h, w, C]`` (or ``[B, T, H, W, 3]``
    of ``[B, N, h, w, C]``): pixels in [-1, 1], or normalised latents, which the VAE denormalises
    and decodes in causal chunks of ``config.latent.decode_window`` latent frames (0: at once)."""
    units = np.asarray(units)
    if not self.spec.latent:
      return video_lib.to_uint8(units)
    if units.ndim == 4:
      return self.to_pixels(units[None])[0]
    vae = self.vae
    window = self.config.latent.decode_window or None
    with self.on_mesh():
      pixels = vae.decode(vae.denormalize(self._replicate(units)), window=window)
      pixels = parallel.replicated(jnp.clip(pixels, -1.0, 1.0), self.mesh)
    return video_lib.to_uint8(_host(pixels))

  def conditioning_units(self, clips: np.ndarray) -> np.ndarray:
    """Frame units of given clips: float32 ``[B, N, H, W, 3]`` pixels in [-1, 1] at the model's
    size, as they are in a pixel run, or their normalised VAE latents (posterior mean,
    ``[B, 1 + (N - 1) / f_t, h, w, C]``, in causal chunks of ``config.latent.encode_window``)."""
    if not self.spec.latent:
      return clips
    vae = self.vae
    window = self.config.latent.encode_window or None
    with self.on_mesh():
      latents = vae.normalize(vae.encode(self._replicate(clips), window=window).mean)
      latents = parallel.replicated(latents, self.mesh)
    return _host(latents).astype(np.float32)

  def _conditioning_clips(self, video, count: int, num_frames: int) -> np.ndarray | None:
    """``video`` (one clip, or one per prompt) as float32 [B, N, H, W, 3] pixels at the model's
    size, checked; None for no video."""
    if video is None:
      return None
    cfg = self.config
    height, width = cfg.data.height, cfg.data.width
    if not isinstance(video, (list, tuple)) and np.ndim(video) != 5:
      video = [video] * count  # one clip for every prompt
    if len(video) != count:
      raise SamplerArgumentError(f"video: need one clip for every prompt, or a list of {count} "
                                 f"(one per prompt), got {len(video)}")
    clips = []
    for clip in video:
      clip = np.asarray(clip)
      if clip.ndim != 4 or clip.shape[-1] != 3 or not len(clip):
        raise SamplerArgumentError(f"video: need RGB frames [N, H, W, 3] with N >= 1, got shape "
                                   f"{clip.shape}")
      if clip.dtype == np.uint8:
        clip = video_lib.to_float(np.stack([video_lib.fit_frame(f, height, width)
                                            for f in clip]))
      elif clip.shape[1:3] != (height, width) or not np.all(np.abs(clip) <= 1.0):
        raise SamplerArgumentError(
            f"video: float frames must be pixels in [-1, 1] at the model's size {height}x{width} "
            f"(uint8 frames of any size are resized), got shape {clip.shape}")
      clips.append(clip.astype(np.float32))
    lengths = {len(c) for c in clips}
    if len(lengths) != 1:
      raise SamplerArgumentError(f"video: the clips of a batch need one length, got "
                                 f"{sorted(lengths)} frames")
    n = lengths.pop()
    f_t = cfg.latent.temporal_compression if self.spec.latent else 1
    if (n - 1) % f_t:
      raise SamplerArgumentError(
          f"video: {n} frames; the VAE encodes 1 + {f_t} k frames into 1 + k latent units "
          f"(e.g. {1 + f_t * ((n - 1) // f_t)} or {1 + f_t * ((n - 1) // f_t + 1)})")
    units = 1 + (n - 1) // f_t
    if units > num_frames:
      raise SamplerArgumentError(f"video: {n} frames are {units} frame units, more than "
                                 f"num_frames={num_frames} (the video's units, the given ones "
                                 "included)")
    return np.stack(clips)

  def _check_arguments(self, num_frames, first_frame_steps, later_frame_steps, guidance_scale,
                       video_guidance_scale, guidance_decay=0.0,
                       min_guidance_scale=MIN_GUIDANCE_SCALE) -> None:
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
                        ("video_guidance_scale", video_guidance_scale),
                        ("min_guidance_scale", min_guidance_scale)):
      if scale is not None and not np.isfinite(scale):
        raise SamplerArgumentError(f"{name}={scale}: need a finite number")
    if not (np.isfinite(guidance_decay) and guidance_decay >= 0):
      raise SamplerArgumentError(f"guidance_decay={guidance_decay}: need a finite number >= 0 "
                                 "(the guidance lost per frame unit; 0 = no decay)")

  def caption(self, prompt: str | Sequence[str],
              negative_prompt: str | Sequence[str] = "") -> batch_lib.TextTokens:
    """The MM-DiT's caption rows for B prompts: rows 0..B-1 the prompts, rows B..2B-1 their
    unconditional captions, the negative prompts, or for ``""`` the null caption (BOS only for
    bytes; for frozen encoders one token of zero features, as caption dropout trains it,
    ``pfm.objective``, or with ``text.null_caption="encoded"`` the encoders' features of the
    empty caption, as the released models' pipeline gives them). Every prompt gets
    ``config.sample.prompt_suffix`` appended (the released models': ", hyper quality, ...")."""
    prompts = [p + self.config.sample.prompt_suffix for p in _prompt_list(prompt)]
    negatives = _per_prompt(negative_prompt, len(prompts), "negative_prompt")
    if self.config.text.encoder != "byte":
      return self._caption_features(prompts, negatives)
    text_len = self.config.data.caption_length
    texts = prompts + negatives
    for text in texts:
      if not text_lib.caption_fits(text, text_len):
        logging.warning(
            "The caption has %d UTF-8 bytes; the model reads the first %d (config.data."
            "caption_length %d, BOS included), cut at a character boundary: %r",
            len(text.encode("utf-8")), text_len - 1, text_len,
            text_lib.decode_caption(text_lib.encode_caption(text, text_len)))
    text_tokens = np.zeros((len(texts), text_len), np.int32)
    for row, text in enumerate(texts):
      encoded = text_lib.encode_caption(text, text_len)
      text_tokens[row, :len(encoded)] = encoded
    segment_ids = (text_tokens > 0).astype(np.int32)
    return batch_lib.TextTokens(segment_ids=jnp.asarray(segment_ids),
                                t=jnp.ones(text_tokens.shape), tokens=jnp.asarray(text_tokens))

  def _caption_features(self, prompts: list[str], negatives: list[str]) -> batch_lib.TextTokens:
    """Frozen-encoder caption features of the prompts and their unconditional captions (see
    `caption`)."""
    if self._text_encoders is None:  # loaded on first use: byte-caption runs never need them
      self._text_encoders = latent.CaptionEncoder.from_config(self.config)
    texts = prompts + negatives
    encode_empty = self.config.text.null_caption == "encoded"
    encoded = [i for i, text in enumerate(texts) if i < len(prompts) or text or encode_empty]
    features = dict(zip(encoded, self._text_encoders([texts[i] for i in encoded])))
    length = self.config.text.max_length
    width = next(iter(features.values()))["text_embeddings"].shape[-1]
    rows = np.zeros((len(texts), length, width), np.float32)
    segment_ids = np.zeros((len(texts), length), np.int32)
    pooled = None
    if "pooled" in features[0]:
      pooled = np.zeros((len(texts), length, len(features[0]["pooled"])), np.float32)
    for row in range(len(texts)):
      if row not in features:  # the null caption
        segment_ids[row, 0] = 1
        continue
      embeddings = features[row]["text_embeddings"]
      rows[row, :len(embeddings)] = embeddings
      segment_ids[row, :len(embeddings)] = 1
      if pooled is not None:
        pooled[row] = features[row]["pooled"]
    return batch_lib.TextTokens(segment_ids=jnp.asarray(segment_ids), t=jnp.ones((len(texts),
                                                                                   length)),
                                embeddings=jnp.asarray(rows),
                                pooled=None if pooled is None else jnp.asarray(pooled))

  def _generate_clip(self, prompts, negatives, key_data, num_frames, steps, guidance_scale):
    coarsest = self._pyramid.temporal_factors[-1]
    if num_frames % coarsest:
      raise SamplerArgumentError(f"num_frames={num_frames} is not divisible by the coarsest "
                                 f"stage's frame-rate reduction {coarsest}")
    steps = tuple(steps or self.spec.steps_per_stage)
    with self.on_mesh():
      x = _host(self._sample_clip(
          self._params, self._replicate(key_data),
          self._replicate(self.caption(prompts, negatives)),
          self._replicate(np.float32(guidance_scale)), steps=steps, num_frames=num_frames))
    return x if self.spec.latent else np.clip(x, -1.0, 1.0)


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
    raise SamplerArgumentError(f"--output={path} is a folder; give a file name (.mp4 or .png)")
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.probe"), "wb") as f:
      probe = f.name
    os.remove(probe)
  except OSError as e:
    raise SamplerArgumentError(f"cannot write --output={path}: {e.strerror or e}") from None


def is_image_output(path: str | None) -> bool:
  """Whether ``--output`` names an image (``.png``): text-to-image, one frame unit."""
  return bool(path) and path.lower().endswith(".png")


def output_frames(output: str | None, num_frames: int | None) -> int | None:
  """``--num_frames`` for ``--output``: 1 (text-to-image) for a ``.png``, else as given.

  Raises:
    SamplerArgumentError: for a ``.png`` with ``num_frames`` other than 1.
  """
  if not is_image_output(output):
    return num_frames
  if num_frames not in (None, 1):
    raise SamplerArgumentError(f"--output={output} is one image: sample one frame unit "
                               f"(--num_frames=1, the default for .png), not {num_frames}, or "
                               "write an .mp4")
  return 1


def output_paths(output: str | None, workdir: str, seed: int, num_prompts: int) -> list[str]:
  """Where the videos of ``num_prompts`` prompts go: ``output`` for one prompt, ``NAME_b.EXT``
  for prompt b of several; by default ``workdir/samples/seed<seed + b>.mp4``."""
  if not output:
    return [os.path.join(workdir, "samples", f"seed{seed + b}.mp4") for b in range(num_prompts)]
  if num_prompts == 1:
    return [output]
  stem, ext = os.path.splitext(output)
  return [f"{stem}_{b}{ext}" for b in range(num_prompts)]


def read_prompts(prompts: Sequence[str] | None, prompts_file: str | None) -> list[str]:
  """The captions of ``--prompt`` (repeatable) followed by those of ``--prompts_file`` (one per
  line; empty lines skipped).

  Raises:
    SamplerArgumentError: if there is none, or the file cannot be read.
  """
  captions = list(prompts or [])
  if prompts_file:
    try:
      lines = epath.Path(prompts_file).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
      raise SamplerArgumentError(f"--prompts_file={prompts_file}: {e}") from None
    captions += [line.strip() for line in lines if line.strip()]
  if not captions:
    raise SamplerArgumentError("give at least one caption: --prompt=... (repeatable) or "
                               "--prompts_file=FILE (one per line)")
  return captions


def read_video(path: str, num_frames: int | None, stride: int) -> np.ndarray:
  """The clip to continue (``--video``): uint8 ``[N, H, W, 3]``, frames ``0, stride, ...`` of
  the file, the first ``num_frames`` of them (default all).

  Raises:
    SamplerArgumentError: if the file cannot be decoded or holds fewer frames.
  """
  if stride < 1 or (num_frames is not None and num_frames < 1):
    raise SamplerArgumentError(f"--video_frames={num_frames} / --video_stride={stride}: need "
                               "whole numbers >= 1")
  try:
    return video_lib.read_frames(path, num_frames=num_frames, stride=stride)
  except video_lib.VideoReadError as e:
    raise SamplerArgumentError(f"--video: {e}") from None


def main(argv):
  del argv
  errors.quiet_library_tracebacks()
  distributed.initialize_from_flags()
  prompts = read_prompts(FLAGS.prompt, FLAGS.prompts_file)
  num_frames = output_frames(FLAGS.output, FLAGS.num_frames)
  outputs = output_paths(FLAGS.output, FLAGS.workdir, FLAGS.seed, len(prompts))
  for output in outputs:
    check_writable(output)  # before minutes of sampling, not after
  if FLAGS.image and FLAGS.video:
    raise SamplerArgumentError("give --image (a first frame) or --video (a clip), not both")
  try:
    image = video_lib.read_image(FLAGS.image) if FLAGS.image else None
  except video_lib.VideoReadError as e:
    raise SamplerArgumentError(f"--image: {e}") from None
  video = (read_video(FLAGS.video, FLAGS.video_frames, FLAGS.video_stride) if FLAGS.video
           else None)
  try:
    steps = {name: FLAGS[name].value and [int(v) for v in FLAGS[name].value]
             for name in ("first_frame_steps", "later_frame_steps")}
  except ValueError:
    raise SamplerArgumentError("--first_frame_steps / --later_frame_steps: need comma-separated "
                               "whole numbers, e.g. 20,20,20") from None
  mesh = parse_mesh(FLAGS.mesh) if FLAGS.mesh else None
  sampler = Sampler.from_workdir(FLAGS.workdir, FLAGS.step, mesh=mesh)
  videos = sampler.generate(
      prompts, num_frames=num_frames, **steps, guidance_scale=FLAGS.guidance_scale,
      video_guidance_scale=FLAGS.video_guidance_scale, negative_prompt=FLAGS.negative_prompt,
      guidance_decay=FLAGS.guidance_decay, min_guidance_scale=FLAGS.min_guidance_scale,
      seed=FLAGS.seed, image=image, video=video)
  if jax.process_index() > 0:
    return
  for output, frames in zip(outputs, videos):
    if is_image_output(output):
      video_lib.write_frame_grid(output, [frames[:1]])  # the one frame, lossless
    else:
      video_lib.write_mp4(output, frames)
    print(output)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A pfm.train workdir (config.json + checkpoints).")
  flags.DEFINE_multi_string("prompt", None, "A caption to generate; repeat the flag for several "
                            "videos, sampled as one batch (prompt b with seed + b).")
  flags.DEFINE_string("prompts_file", None, "A text file of captions, one per line, sampled "
                      "after the --prompt ones in the same batch.")
  flags.DEFINE_string("negative_prompt", None, "The caption of the unconditional branch of "
                      "classifier-free guidance (default: config.sample.negative_prompt, the null "
                      "caption for pfm's own runs; \"\" is the null caption).")
  flags.DEFINE_string("image", None, "Optional first frame (png/jpg) for image-to-video.")
  flags.DEFINE_string("video", None, "Optional video (mp4, ...) to continue: its frames are the "
                      "start of the output and the history of the units sampled after them.")
  flags.DEFINE_integer("video_frames", None, "Frames of --video to continue from (default: all; "
                       "a latent run needs 1 + f_t k).")
  flags.DEFINE_integer("video_stride", 1, "Take every n-th frame of --video (the training clips "
                       "take every config.data.frame_stride-th frame of theirs).")
  flags.DEFINE_integer("num_frames", None, "Frame units per video, a given image or clip "
                       "included (default: config; 1 for a .png --output).")
  flags.DEFINE_list("first_frame_steps", None,
                    "Steps per stage for the first frame (full-sequence mode: for the clip).")
  flags.DEFINE_list("later_frame_steps", None, "Euler steps per stage for later frames.")
  flags.DEFINE_float("guidance_scale", None, "Guidance scale for the first frame.")
  flags.DEFINE_float("video_guidance_scale", None, "Guidance scale for later frames.")
  flags.DEFINE_float("guidance_decay", 0.0, "Guidance decaying over the frame units: unit i uses "
                     "max(guidance_scale - guidance_decay * i, min_guidance_scale) (Pyramid "
                     "Flow's linear guidance, e.g. 0.5); 0 keeps the two fixed scales.")
  flags.DEFINE_float("min_guidance_scale", MIN_GUIDANCE_SCALE,
                     "The floor of the decaying guidance (--guidance_decay).")
  flags.DEFINE_integer("seed", 0, "Sampling seed (of the first prompt; prompt b uses seed + b).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_string("output", None, "Output mp4 path (default: workdir/samples/seed<N>.mp4), "
                      "or a .png for text-to-image; several prompts write NAME_<b>.EXT.")
  flags.DEFINE_string("mesh", None, "Sampling mesh sizes overriding config.mesh, e.g. "
                      "data=1,sequence=-1 (-1: the devices left over).")
  distributed.define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(errors.exit_on_user_error(main, "pfm.sample"))
