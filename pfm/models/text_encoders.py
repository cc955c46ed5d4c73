"""Frozen text encoders of the released models, in Flax NNX: the T5 v1.1 encoder and CLIP's text
tower, loaded from Hugging Face-format folders (``config.json`` + ``*.safetensors``).

Pyramid Flow (SD3-based) conditions its MM-DiT on T5-XXL token features and on the pooled,
projected outputs of two CLIP text towers (ViT-L/14 and OpenCLIP ViT-bigG/14, 768 + 1280 = 2048
features), as SD3 does. Flax implementations of these models were removed from `transformers` in
its v5 line and no maintained JAX package carries them, so they are written here, layer for layer
after the reference implementations (`T5EncoderModel`, `CLIPTextModelWithProjection`), and tested
against outputs those produced on tiny random checkpoints (``tools/make_text_encoder_fixtures.py``).

Tokenisation uses the `tokenizers` library on the folder's ``tokenizer.json``.

Shapes: token ids int32 [B, L]; attention masks int32/bool [B, L] (1 = token, 0 = padding);
features float32 [B, L, D].
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class CheckpointLayoutError(KeyError):
  """A checkpoint lacks a tensor the model needs, or has one it does not know (named)."""


def read_config(folder: str) -> dict[str, Any]:
  """The folder's ``config.json`` as a dict; FileNotFoundError naming the path."""
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{folder}: no config.json (a Hugging Face model folder is expected)")
  with open(path) as f:
    return json.load(f)


def read_safetensors(folder: str) -> dict[str, np.ndarray]:
  """Every tensor of the folder's ``*.safetensors`` files (sharded checkpoints included)."""
  from safetensors.numpy import load_file
  files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"{folder}: no .safetensors file")
  tensors: dict[str, np.ndarray] = {}
  for path in files:
    tensors.update(load_file(path))
  return tensors


def load_tokenizer(folder: str):
  """The folder's ``tokenizer.json`` as a `tokenizers.Tokenizer`."""
  import tokenizers
  path = os.path.join(folder, "tokenizer.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{folder}: no tokenizer.json (save the tokenizer with a fast Hugging Face tokenizer, "
      "`AutoTokenizer.from_pretrained(folder).save_pretrained(folder)`)")
  return tokenizers.Tokenizer.from_file(path)


def tokenize(tokenizer, texts: list[str], max_length: int, *, pad_id: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and mask [B, max_length] (int32): the tokenizer's post-processing (special
  tokens) applied, cut at max_length, padded with ``pad_id``."""
  tokenizer.no_padding()
  tokenizer.enable_truncation(max_length)
  encodings = tokenizer.encode_batch(texts)
  ids = np.full((len(texts), max_length), pad_id, np.int32)
  mask = np.zeros((len(texts), max_length), np.int32)
  for i, e in enumerate(encodings):
    ids[i, :len(e.ids)] = e.ids
    mask[i, :len(e.ids)] = 1
  return ids, mask


def _linear(din: int, dout: int, bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(din, dout, use_bias=bias, rngs=rngs)


def _assign(param: nnx.Variable, value: np.ndarray, name: str) -> None:
  value = np.asarray(value, np.float32)
  if value.shape != param[...].shape:
    raise ValueError(f"{name}: shape {value.shape}, the model needs {param[...].shape}")
  param[...] = jnp.asarray(value)


class _Loader:
  """Pops tensors by name from a state dict; `finish` refuses any left over."""

  def __init__(self, tensors: dict[str, np.ndarray], ignore: tuple[str, ...] = ()):
    self.tensors = {k: v for k, v in tensors.items() if not any(k.startswith(p) for p in ignore)}

  def linear(self, layer: nnx.Linear, prefix: str) -> None:
    self.set(layer.kernel, prefix + ".weight", transpose=True)
    if layer.bias is not None:
      self.set(layer.bias, prefix + ".bias")

  def set(self, param, name: str, transpose: bool = False) -> None:
    if name not in self.tensors:
      raise CheckpointLayoutError(f"missing tensor {name}")
    value = self.tensors.pop(name)
    _assign(param, value.T if transpose else value, name)

  def pop(self, name: str) -> np.ndarray | None:
    return self.tensors.pop(name, None)

  def finish(self) -> None:
    if self.tensors:
      raise CheckpointLayoutError(f"unexpected tensors: {sorted(self.tensors)[:5]}")


# -- T5 v1.1 encoder ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class T5Config:
  """The encoder fields of a T5 ``config.json`` (T5-XXL v1.1: d_model 4096, d_kv 64, d_ff
  10240, 24 layers, 64 heads, gated-GELU)."""
  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> T5Config:
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in fields})


def t5_relative_position_bucket(relative_position: jax.Array, num_buckets: int,
                                max_distance: int) -> jax.Array:
  """T5's bidirectional bucket of (key - query) offsets (Raffel et al., 2020, Sec. 2.1): half the
  buckets per direction, exact for |offset| < num_buckets / 4, logarithmic up to max_distance."""
  num_buckets //= 2
  buckets = (relative_position > 0).astype(jnp.int32) * num_buckets
  distance = jnp.abs(relative_position)
  max_exact = num_buckets // 2
  large = max_exact + (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
                       / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(distance < max_exact, distance, large)


class T5LayerNorm(nnx.Module):
  """RMS norm without mean subtraction or bias, statistics in float32 (T5's layer norm)."""

  def __init__(self, dim: int, eps: float):
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 ** 2, -1, keepdims=True) + self.eps)
    return (self.weight[...] * x32).astype(x.dtype)


def _gelu_tanh(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


class T5Block(nnx.Module):
  def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
    inner = config.num_heads * config.d_kv
    self.attention_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
    self.q = _linear(config.d_model, inner, False, rngs)
    self.k = _linear(config.d_model, inner, False, rngs)
    self.v = _linear(config.d_model, inner, False, rngs)
    self.o = _linear(inner, config.d_model, False, rngs)
    self.mlp_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
    self.gated = config.feed_forward_proj.startswith("gated")
    self.wi_0 = _linear(config.d_model, config.d_ff, False, rngs)
    self.wi_1 = _linear(config.d_model, config.d_ff, False, rngs) if self.gated else None
    self.wo = _linear(config.d_ff, config.d_model, False, rngs)
    self.heads, self.d_kv = config.num_heads, config.d_kv
    self.act = _gelu_tanh if "gelu" in config.feed_forward_proj else jax.nn.relu

  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    b, n, _ = x.shape
    h = self.attention_norm(x)
    q, k, v = (f(h).reshape(b, n, self.heads, self.d_kv) for f in (self.q, self.k, self.v))
    # T5 does not scale the logits by 1 / sqrt(d_kv) (it is folded into the initialisation).
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    x = x + self.o(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, -1))
    h = self.mlp_norm(x)
    hidden = self.act(self.wi_0(h))
    if self.gated:
      hidden = hidden * self.wi_1(h)
    return x + self.wo(hidden)


class T5Encoder(nnx.Module):
  """The T5 v1.1 encoder stack: [B, L] ids (+ mask) -> [B, L, d_model] float32 features
  (after the final RMS norm), as `T5EncoderModel(...).last_hidden_state`."""

  def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = nnx.Embed(config.vocab_size, config.d_model, rngs=rngs)
    self.relative_attention_bias = nnx.Embed(config.relative_attention_num_buckets,
                                             config.num_heads, rngs=rngs)
    self.blocks = nnx.List([T5Block(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

  def position_bias(self, length: int) -> jax.Array:
    """[1, heads, L, L] learned bias of each (query, key) offset bucket (shared by all layers)."""
    position = jnp.arange(length)
    buckets = t5_relative_position_bucket(
      position[None, :] - position[:, None], self.config.relative_attention_num_buckets,
      self.config.relative_attention_max_distance)
    return self.relative_attention_bias(buckets).transpose(2, 0, 1)[None].astype(jnp.float32)

  def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    x = self.embed(ids)
    bias = self.position_bias(ids.shape[1])
    if mask is not None:
      bias = bias + jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
    for block in self.blocks:
      x = block(x, bias)
    return self.final_norm(x).astype(jnp.float32)

  @classmethod
  def from_pretrained(cls, folder: str) -> T5Encoder:
    """Loads a Hugging Face T5 (encoder or encoder-decoder) folder; the decoder and LM head, if
    present, are ignored. CheckpointLayoutError names a missing or unexpected tensor."""
    config = T5Config.from_dict(read_config(folder))
    model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    model = _materialise(model)
    loader = _Loader(read_safetensors(folder), ignore=("decoder.", "lm_head."))
    embed = loader.pop("shared.weight")
    tied = loader.pop("encoder.embed_tokens.weight")
    if embed is None and tied is None:
      raise CheckpointLayoutError("missing tensor shared.weight (or encoder.embed_tokens.weight)")
    _assign(model.embed.embedding, embed if embed is not None else tied, "shared.weight")
    for i, block in enumerate(model.blocks):
      p = f"encoder.block.{i}.layer."
      loader.set(block.attention_norm.weight, p + "0.layer_norm.weight")
      for name in ("q", "k", "v", "o"):
        loader.linear(getattr(block, name), p + f"0.SelfAttention.{name}")
      if i == 0:
        loader.set(model.relative_attention_bias.embedding,
                   p + "0.SelfAttention.relative_attention_bias.weight")
      loader.set(block.mlp_norm.weight, p + "1.layer_norm.weight")
      ff = p + "1.DenseReluDense."
      if block.gated:
        loader.linear(block.wi_0, ff + "wi_0")
        loader.linear(block.wi_1, ff + "wi_1")
      else:
        loader.linear(block.wi_0, ff + "wi")
      loader.linear(block.wo, ff + "wo")
    loader.set(model.final_norm.weight, "encoder.final_layer_norm.weight")
    loader.finish()
    return model


# -- CLIP text tower ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The fields of a CLIP text ``config.json`` (ViT-L/14: hidden 768, 12 layers, 12 heads,
  quick GELU, projection 768; OpenCLIP ViT-bigG/14: hidden 1280, 32 layers, 20 heads, GELU,
  projection 1280). A ``CLIPConfig`` folder's ``text_config`` is read as well."""
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 768
  eos_token_id: int = 49407

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> CLIPTextConfig:
    d = {**d, **d.get("text_config", {})}
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in fields})


_ACTIVATIONS = {
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": _gelu_tanh,
}


@dataclasses.dataclass(frozen=True)
class CLIPTextOutput:
  """Outputs of `CLIPTextEncoder`: ``last_hidden_state`` [B, L, D] (after the final layer norm),
  ``hidden_states`` (the embeddings and every layer's output before it, num_layers + 1 of
  [B, L, D]; SD3 reads ``hidden_states[-2]``), ``pooled`` [B, D] (the final state at the end
  token) and ``text_embeds`` [B, projection_dim] (``pooled`` projected; None without one)."""
  last_hidden_state: jax.Array
  hidden_states: tuple[jax.Array, ...]
  pooled: jax.Array
  text_embeds: jax.Array | None


class CLIPLayer(nnx.Module):
  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
    d = config.hidden_size
    self.layer_norm1 = nnx.LayerNorm(d, epsilon=config.layer_norm_eps, rngs=rngs)
    self.q_proj, self.k_proj = _linear(d, d, True, rngs), _linear(d, d, True, rngs)
    self.v_proj, self.out_proj = _linear(d, d, True, rngs), _linear(d, d, True, rngs)
    self.layer_norm2 = nnx.LayerNorm(d, epsilon=config.layer_norm_eps, rngs=rngs)
    self.fc1 = _linear(d, config.intermediate_size, True, rngs)
    self.fc2 = _linear(config.intermediate_size, d, True, rngs)
    self.heads = config.num_attention_heads
    self.act = _ACTIVATIONS[config.hidden_act]

  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    b, n, d = x.shape
    dh = d // self.heads
    h = self.layer_norm1(x)
    q, k, v = (f(h).reshape(b, n, self.heads, dh) for f in (self.q_proj, self.k_proj, self.v_proj))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(dh)
    weights = jax.nn.softmax(logits + bias, axis=-1).astype(v.dtype)
    x = x + self.out_proj(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, d))
    return x + self.fc2(self.act(self.fc1(self.layer_norm2(x))))


class CLIPTextEncoder(nnx.Module):
  """CLIP's text transformer with its projection: [B, L] ids -> `CLIPTextOutput`.

  Causal self-attention (and, with a mask, no attention to padding), learned positions, pre-norm
  layers, a final layer norm; the pooled state is taken at the first end token
  (``eos_token_id``; for configs with the legacy id 2, at the largest id, as the reference does).
  """

  def __init__(self, config: CLIPTextConfig, *, projection: bool = True, rngs: nnx.Rngs):
    self.config = config
    d = config.hidden_size
    self.token_embedding = nnx.Embed(config.vocab_size, d, rngs=rngs)
    self.position_embedding = nnx.Embed(config.max_position_embeddings, d, rngs=rngs)
    self.layers = nnx.List([CLIPLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])
    self.final_layer_norm = nnx.LayerNorm(d, epsilon=config.layer_norm_eps, rngs=rngs)
    self.text_projection = _linear(d, config.projection_dim, False, rngs) if projection else None

  def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> CLIPTextOutput:
    b, n = ids.shape
    if n > self.config.max_position_embeddings:
      raise ValueError(f"CLIP takes at most {self.config.max_position_embeddings} tokens, got {n}")
    x = self.token_embedding(ids) + self.position_embedding(jnp.arange(n))[None]
    allowed = jnp.tril(jnp.ones((n, n), bool))[None, None]
    if mask is not None:
      allowed = allowed & (mask[:, None, None, :] > 0)
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
    states = [x]
    for layer in self.layers:
      x = layer(x, bias)
      states.append(x)
    last = self.final_layer_norm(x)
    if self.config.eos_token_id == 2:
      end = jnp.argmax(ids, axis=-1)
    else:
      end = jnp.argmax((ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)
    pooled = last[jnp.arange(b), end]
    embeds = self.text_projection(pooled) if self.text_projection is not None else None
    return CLIPTextOutput(last.astype(jnp.float32), tuple(states), pooled.astype(jnp.float32),
                          None if embeds is None else embeds.astype(jnp.float32))

  @classmethod
  def from_pretrained(cls, folder: str) -> CLIPTextEncoder:
    """Loads a Hugging Face `CLIPTextModel(WithProjection)` (or whole `CLIPModel`: its vision
    tower is ignored) folder. CheckpointLayoutError names a missing or unexpected tensor."""
    config = CLIPTextConfig.from_dict(read_config(folder))
    tensors = read_safetensors(folder)
    projection = "text_projection.weight" in tensors
    model = _materialise(nnx.eval_shape(lambda: cls(config, projection=projection,
                                                     rngs=nnx.Rngs(0))))
    loader = _Loader(tensors, ignore=("vision_model.", "visual_projection.", "logit_scale",
                                      "text_model.embeddings.position_ids"))
    p = "text_model."
    loader.set(model.token_embedding.embedding, p + "embeddings.token_embedding.weight")
    loader.set(model.position_embedding.embedding, p + "embeddings.position_embedding.weight")
    for i, layer in enumerate(model.layers):
      q = f"{p}encoder.layers.{i}."
      for norm in ("layer_norm1", "layer_norm2"):
        loader.set(getattr(layer, norm).scale, q + norm + ".weight")
        loader.set(getattr(layer, norm).bias, q + norm + ".bias")
      for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        loader.linear(getattr(layer, name), q + "self_attn." + name)
      loader.linear(layer.fc1, q + "mlp.fc1")
      loader.linear(layer.fc2, q + "mlp.fc2")
    loader.set(model.final_layer_norm.scale, p + "final_layer_norm.weight")
    loader.set(model.final_layer_norm.bias, p + "final_layer_norm.bias")
    if projection:
      loader.linear(model.text_projection, "text_projection")
    loader.finish()
    return model


def _materialise(abstract: nnx.Module) -> nnx.Module:
  """An abstract (eval_shape) module with zero arrays in place of its shapes, to load into."""
  graphdef, state = nnx.split(abstract)
  state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state)
  return nnx.merge(graphdef, state)
