"""The latent world's loaders, shared by extraction, training and sampling: the causal VAE of a
``pfm.train_vae`` workdir and the frozen caption encoders of ``config.text``."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from pfm import checkpointing
from pfm import errors
from pfm import parallel
from pfm.models import text_encoders as te
from pfm.models import vae as vae_lib

VAE_FILE = "vae.json"  # a pfm.train_vae workdir: the VAEConfig's fields, beside checkpoints/


def load_vae(workdir: str, step: int | None = None, *, mesh: jax.sharding.Mesh | None = None,
             rules=None) -> vae_lib.CausalVideoVAE:
  """The trained VAE of a `pfm.train_vae` workdir (its newest intact checkpoint, or ``step``).

  Args:
    workdir: a `pfm.train_vae` (or `pfm.convert`) VAE workdir.
    step: the checkpoint step; default the newest intact one.
    mesh: restore the parameters straight into the shardings ``rules`` give their logical axis
      names on this mesh (the sampler's: conv kernels split their input channels as ``embed``
      and their output channels as ``mlp``; unnamed parameters are replicated), for a network
      that runs on the mesh's global arrays. None: replicated on this process's devices, each
      process running the frozen network on its own data without collectives (``pfm.extract``).
    rules: the logical-axis rules for ``mesh`` (default `pfm.parallel.DEFAULT_RULES`).

  Raises:
    pfm.errors.NotAWorkdirError: if ``workdir`` has no ``vae.json``.
    pfm.checkpointing.CheckpointError: if there is no usable checkpoint.
  """
  path = epath.Path(workdir) / VAE_FILE
  if not path.exists():
    raise errors.NotAWorkdirError(f"{workdir} is not a pfm.train_vae workdir (no {VAE_FILE})")
  fields = json.loads(path.read_text())
  config = vae_lib.VAEConfig(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in fields.items()})
  model = nnx.eval_shape(lambda: vae_lib.CausalVideoVAE(config, rngs=nnx.Rngs(0)))
  graphdef, abstract = nnx.split(model, nnx.Param)
  if mesh is not None:
    shardings = parallel.named_shardings(abstract, mesh, rules or parallel.DEFAULT_RULES)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_divisible(s, x.shape)),
        abstract, shardings)
    return nnx.merge(graphdef, _restore_vae(workdir, abstract, step))
  # Restored replicated over every process's devices (so the checkpoint's checksums, summed over
  # processes, hold), then kept on this process's devices: each process runs the frozen network
  # on its own data, without collectives.
  everywhere = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), ("d",)),
                                          jax.sharding.PartitionSpec())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=everywhere),
                          abstract)
  params = _restore_vae(workdir, abstract, step)
  here = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.local_devices()), ("d",)),
                                    jax.sharding.PartitionSpec())
  params = jax.tree.map(lambda x: jax.device_put(np.asarray(x.addressable_data(0)), here), params)
  return nnx.merge(graphdef, params)


def _divisible(sharding: jax.sharding.NamedSharding, shape) -> jax.sharding.NamedSharding:
  """``sharding`` with the dimensions its mesh axes do not divide evenly left whole (the RGB
  input channels of the first conv, a 16-channel latent over 32 devices)."""
  spec = []
  for size, entry in zip(shape, tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    split = int(np.prod([sharding.mesh.shape[a] for a in axes]))
    spec.append(entry if size % split == 0 else None)
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def _restore_vae(workdir: str, abstract, step: int | None):
  """The ``vae`` parameters of a VAE workdir's checkpoint, into ``abstract``'s shardings."""
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    state, _ = checkpointer.restore({"vae": abstract}, step=step, partial=True)
  finally:
    checkpointer.close(check=False)
  return state["vae"]


def save_vae(workdir: str, model: vae_lib.CausalVideoVAE, step: int = 0) -> None:
  """Writes ``model`` as a VAE workdir that `load_vae` (``pfm.extract``, ``pfm.sample``) opens:
  ``vae.json`` and an orbax checkpoint of its parameters at ``step`` (e.g. converted weights)."""
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  (path / VAE_FILE).write_text(json.dumps(dataclasses.asdict(model.config), indent=2))
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    checkpointer.save(step, {"vae": nnx.state(model, nnx.Param)}, force=True)
  finally:
    checkpointer.close()


def clip_paths(c) -> tuple[str, ...]:
  """The CLIP tower folders of ``config.text.clip`` (a sequence, or a comma-separated string)."""
  paths = c.text.clip
  if isinstance(paths, str):
    paths = paths.split(",")
  return tuple(p for p in paths if p)


class CaptionEncoder:
  """Frozen caption encoders (``config.text``): T5 token features and, for ``t5_clip``, the
  concatenated pooled projections of the CLIP towers (Pyramid Flow's SD3 text encoder).

  Calling it on captions returns, per caption, ``{"text_embeddings": float32 [n, E]}`` (the
  caption's n <= ``text.max_length`` T5 tokens, EOS included, padding cut off) and, with CLIP,
  ``"pooled": float32 [Ep]``.

  Raises:
    FileNotFoundError: if a folder lacks its config, weights or tokenizer.
    pfm.errors.ConfigError: if the encoders' widths differ from ``model.text_embed_dim`` /
      ``model.pooled_embed_dim``.
  """

  def __init__(self, t5_folder: str, clip_folders: tuple[str, ...], max_length: int, *,
               clip_projection: bool = True):
    self.max_length = max_length
    self.t5 = te.T5Encoder.from_pretrained(t5_folder)
    self.t5_tokenizer = te.load_tokenizer(t5_folder)
    self.t5_pad = self.t5_tokenizer.token_to_id("<pad>") or 0
    self.clips = [(te.CLIPTextEncoder.from_pretrained(f), te.load_tokenizer(f))
                  for f in clip_folders]
    if not clip_projection:  # FLUX reads CLIPTextModel's pooled state, not its projection
      for model, _ in self.clips:
        model.text_projection = None
    self._t5_fn = nnx.jit(lambda m, ids, mask: m(ids, mask))
    # The projected pooled state (CLIPTextModelWithProjection, SD3), or the pooled state itself
    # for a tower without projection (CLIPTextModel's pooler_output, FLUX).
    self._clip_fn = nnx.jit(lambda m, ids: (lambda out: out.pooled if out.text_embeds is None
                                            else out.text_embeds)(m(ids)))
    self.embed_dim = self.t5.config.d_model
    self.pooled_dim = sum(m.config.hidden_size if m.text_projection is None
                          else m.config.projection_dim for m, _ in self.clips)

  @classmethod
  def from_config(cls, config) -> CaptionEncoder:
    if not config.text.t5:
      raise errors.ConfigError(f"config.text.encoder={config.text.encoder!r} needs "
                               "config.text.t5 (a T5 v1.1 encoder folder)")
    clips = clip_paths(config)
    if config.text.encoder == "t5_clip" and not clips:
      raise errors.ConfigError("config.text.encoder='t5_clip' needs config.text.clip (the CLIP "
                               "text tower folders, comma-separated)")
    encoder = cls(config.text.t5, clips if config.text.encoder == "t5_clip" else (),
                  config.text.max_length, clip_projection=bool(config.text.clip_projection))
    for field, want, have in (("model.text_embed_dim", config.model.text_embed_dim,
                               encoder.embed_dim),
                              ("model.pooled_embed_dim", config.model.pooled_embed_dim,
                               encoder.pooled_dim)):
      if want != have:
        raise errors.ConfigError(f"config.{field}={want}, but the text encoders give {have}")
    return encoder

  def __call__(self, captions: list[str]) -> list[dict[str, np.ndarray]]:
    ids, mask = te.tokenize(self.t5_tokenizer, captions, self.max_length, pad_id=self.t5_pad)
    features = np.asarray(self._t5_fn(self.t5, jnp.asarray(ids), jnp.asarray(mask)))
    pooled = []
    for model, tokenizer in self.clips:  # CLIP pads with its end token; pooled at the first
      clip_ids, _ = te.tokenize(tokenizer, captions, model.config.max_position_embeddings,
                                pad_id=tokenizer.token_to_id("<|endoftext|>"))
      pooled.append(np.asarray(self._clip_fn(model, jnp.asarray(clip_ids))))
    out = []
    for i in range(len(captions)):
      item = {"text_embeddings": features[i, :max(int(mask[i].sum()), 1)]}
      if pooled:
        item["pooled"] = np.concatenate([p[i] for p in pooled])
      out.append(item)
    return out


