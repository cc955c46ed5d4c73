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
from pfm.models import text_encoders as te
from pfm.models import vae as vae_lib

VAE_FILE = "vae.json"  # a pfm.train_vae workdir: the VAEConfig's fields, beside checkpoints/


def load_vae(workdir: str, step: int | None = None) -> vae_lib.CausalVideoVAE:
  """The trained VAE of a `pfm.train_vae` workdir (its newest intact checkpoint, or ``step``).

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
  # Restored replicated over every process's devices (so the checkpoint's checksums, summed over
  # processes, hold), then kept on this process's devices: each process runs the frozen network
  # on its own data, without collectives.
  everywhere = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), ("d",)),
                                          jax.sharding.PartitionSpec())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=everywhere),
                          abstract)
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    state, _ = checkpointer.restore({"vae": abstract}, step=step, partial=True)
  finally:
    checkpointer.close(check=False)
  here = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.local_devices()), ("d",)),
                                    jax.sharding.PartitionSpec())
  params = jax.tree.map(lambda x: jax.device_put(np.asarray(x.addressable_data(0)), here),
                        state["vae"])
  return nnx.merge(graphdef, params)


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

  def __init__(self, t5_folder: str, clip_folders: tuple[str, ...], max_length: int):
    self.max_length = max_length
    self.t5 = te.T5Encoder.from_pretrained(t5_folder)
    self.t5_tokenizer = te.load_tokenizer(t5_folder)
    self.t5_pad = self.t5_tokenizer.token_to_id("<pad>") or 0
    self.clips = [(te.CLIPTextEncoder.from_pretrained(f), te.load_tokenizer(f))
                  for f in clip_folders]
    self._t5_fn = nnx.jit(lambda m, ids, mask: m(ids, mask))
    self._clip_fn = nnx.jit(lambda m, ids: m(ids).text_embeds)
    self.embed_dim = self.t5.config.d_model
    self.pooled_dim = sum(m.config.projection_dim for m, _ in self.clips)

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
                  config.text.max_length)
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


