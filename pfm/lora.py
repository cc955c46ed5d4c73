r"""LoRA: low-rank adapters on a frozen MM-DiT (Hu et al., ICLR 2022), added by qwix.

A LoRA run (``config.train.lora.rank = r > 0``) starts from the EMA weights of another run
(``config.train.init_from``), keeps them frozen and trains, for every targeted linear layer with
kernel W [*in, *out], two factors A [prod(in), r] and B [r, prod(out)] (``nnx.LoRAParam``):

    y = x W + (alpha / r) x A B + b                                    (Hu et al., Eq. 3)

B starts at zero, so the adapted model starts as the base model. qwix's ``LoraProvider``
intercepts the ``dot_general`` of every ``nnx.Linear`` and ``nnx.LinearGeneral`` whose module
path (``"/"``-joined attribute names, matched whole by ``re.fullmatch``) matches, and creates A
and B beside the kernel (``kernel_lora_a``, ``kernel_lora_b``) on the first call. The attention
projections are ``nnx.LinearGeneral`` layers named ``qkv/q``, ``qkv/k``, ``qkv/v`` and ``out``
in each stream of a joint block (``attention_out`` in a single-stream block), e.g.

    blocks/0/video/qkv/q   blocks/0/video/out   blocks/0/video/mlp/fc1   blocks/0/video/modulation
    single_blocks/0/qkv/q  single_blocks/0/attention_out

`TARGETS` names the usual choices over the joint blocks' text and video streams and the
single-stream blocks; any other module-path regex works too (``text_encoder/.*``,
``final_layer/linear``, ...).

Adapters are created on the first call of the model, which qwix cannot do inside a
``jax.lax.scan`` or a ``jax.checkpoint``: `add_adapters` therefore creates them on a twin that
runs its blocks one by one without remat and sets them on the model's own layers (stacked on the
``layers`` axis for ``model.scan_layers``). `merge` folds them into the kernels,
W + (alpha / r) A B, for sampling with the plain model.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from pfm import errors
from pfm import models
from pfm.batch import TextTokens, VideoTokens
from pfm.models.axes import LAYER_AXIS

# Names of `train.lora.targets`: layers of each joint block's text and video streams (unstacked,
# or stacked by scan_layers) and of each single-stream block.
_BLOCK_STREAM = r"(?:(?:blocks(?:/\d+)?|last_block)/(?:text|video)|single_blocks(?:/\d+)?)/"
TARGETS = {
    "attention": r"qkv/[qkv]|out|attention_out",  # query, key, value and output projections
    "mlp": r"mlp/fc[12]",           # the feed-forward block
    "modulation": r"modulation",    # adaLN-Zero's shift, scale and gate
}
_ADAPTER_A, _ADAPTER_B = "_lora_a", "_lora_b"  # qwix's suffixes of the kernel's name


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """A LoRA run's adapters (``config.train.lora``, resolved by ``pfm.spec``).

  Attributes:
    rank: r >= 1, the inner size of A [in, r] and B [r, out].
    alpha: the adapter's scale is alpha / r (> 0).
    module_path: regex, matched whole against the module path of each linear layer of the
      model with its blocks unstacked (``blocks/<i>/...``); see `module_path`.
  """

  rank: int
  alpha: float
  module_path: str

  @property
  def scale(self) -> float:
    """alpha / r, the factor of x A B."""
    return self.alpha / self.rank


def module_path(targets: str | Sequence[str]) -> str:
  """The module-path regex of ``train.lora.targets``.

  Args:
    targets: one entry or a sequence of them; each is a name of `TARGETS` (that layer kind in
      every joint block's text and video stream) or a module-path regex (``re.fullmatch``).

  Returns:
    one regex matching any of the entries.

  Raises:
    ValueError: for no entry, an entry that is not a string, or a regex that does not compile.
  """
  entries = (targets,) if isinstance(targets, str) else tuple(targets)
  if not entries:
    raise ValueError(f"need at least one of {sorted(TARGETS)} or a module-path regex")
  parts = []
  for entry in entries:
    if not isinstance(entry, str):
      raise ValueError(f"{entry!r} is not a string: give names of {sorted(TARGETS)} or "
                       "module-path regexes")
    if entry in TARGETS:
      parts.append(f"{_BLOCK_STREAM}(?:{TARGETS[entry]})")
      continue
    try:
      re.compile(entry)
    except re.error as e:
      raise ValueError(f"{entry!r} is neither a name of {sorted(TARGETS)} nor a valid regex "
                       f"({e})") from None
    parts.append(f"(?:{entry})")
  return "|".join(parts)


def _provider(config: LoraConfig, path: str) -> qwix.LoraProvider:
  return qwix.LoraProvider(module_path=path, rank=config.rank, alpha=config.alpha)


def _probe_inputs(config: models.MMDiTConfig) -> tuple[VideoTokens, TextTokens]:
  """One video token and one caption token: enough for qwix to see every targeted layer once."""
  one = jnp.ones((1, 1), jnp.int32)
  video = VideoTokens(tokens=jnp.zeros((1, 1, config.patch_dim)), t=jnp.ones((1, 1)),
                      segment_ids=one, causal_block=jnp.zeros((1, 1), jnp.int32),
                      positions=jnp.zeros((1, 1, 2)))
  byte_text = config.text_depth > 0
  text = TextTokens(
      segment_ids=one, t=jnp.ones((1, 1)), tokens=one if byte_text else None,
      embeddings=None if byte_text else jnp.zeros((1, 1, config.text_embed_dim)),
      pooled=jnp.zeros((1, 1, config.pooled_embed_dim)) if config.pooled_embed_dim else None)
  return video, text


def _joined(path: Sequence) -> str:
  return "/".join(map(str, path))


def _stacked_layout(adapters: dict, depth: int, single_blocks: int = 0) -> dict:
  """Adapters of unstacked blocks (``blocks/<i>/...``, ``single_blocks/<i>/...``) in the
  ``scan_layers`` layout: blocks 0..depth-2 stacked on a leading ``layers`` axis under
  ``blocks/...``, the last block under ``last_block/...``, and every single-stream block stacked
  under ``single_blocks/...``.

  Raises:
    pfm.errors.ConfigError: if the stacked blocks would not all have the same adapters.
  """
  placed, stacked = {}, {}
  for path, variable in adapters.items():
    if path[0] == "blocks" and int(path[1]) == depth - 1:
      placed[("last_block", *path[2:])] = variable
    elif path[0] in ("blocks", "single_blocks"):
      stacked.setdefault((path[0], *path[2:]), {})[int(path[1])] = variable
    else:
      placed[path] = variable
  for (group, *rest), layers in stacked.items():
    count = depth - 1 if group == "blocks" else single_blocks
    if len(layers) != count:
      raise errors.ConfigError(
          f"config.train.lora.targets selects {group}/<i>/{_joined(rest[:-1])} for i in "
          f"{sorted(layers)} only; with config.model.scan_layers=True {group} 0..{count - 1} "
          "are stacked and need the same adapters (select them all, or set scan_layers=False)")
    first = layers[0]
    names = first.get_metadata().get("out_sharding")
    value = jnp.stack([layers[i].get_value() for i in range(count)])
    variable = first.replace(value)
    if names:
      variable = variable.copy(out_sharding=(LAYER_AXIS, *names))
    placed[(group, *rest)] = variable
  return placed


def add_adapters(model: models.MMDiT, config: LoraConfig, seed: int = 0) -> models.MMDiT:
  """A copy of ``model`` with LoRA adapters on the linear layers ``config.module_path`` matches.

  A (he-uniform, seeded by ``seed``) and B (zeros) of each layer are ``nnx.LoRAParam``s whose
  logical axis names follow the kernel's (A the input axes', B the output axes'), so they shard
  with the kernel. The copy's output equals ``model``'s until B moves. Only ``__call__`` adds
  the adapters' term (qwix intercepts that method): sample with `merge`'d weights.

  Works under ``jax.jit`` and ``nnx.eval_shape`` (nothing is allocated there).

  Raises:
    pfm.errors.ConfigError: naming ``config.train.lora.targets`` when it matches no linear
      layer, or (``scan_layers``) selects different layers in the stacked blocks.
  """
  mc = model.config
  plain = not mc.scan_layers and mc.remat_policy == "none"
  twin = model if plain else models.build_model(
      dataclasses.replace(mc, scan_layers=False, remat_policy="none"), rngs=nnx.Rngs(seed))
  created = qwix.apply_lora_to_model(
      twin, _provider(config, config.module_path), *_probe_inputs(mc), rngs=nnx.Rngs(seed))
  adapters = {tuple(path): v for path, v in nnx.to_flat_state(nnx.state(created, nnx.LoRAParam))}
  if not adapters:
    raise errors.ConfigError(
        f"config.train.lora.targets: the module-path regex {config.module_path!r} matches no "
        f"linear layer of the model (paths look like blocks/0/video/qkv/q, "
        f"blocks/0/video/mlp/fc1; names: {sorted(TARGETS)})")
  if mc.scan_layers:
    adapters = _stacked_layout(adapters, mc.depth, mc.single_blocks)
  # qwix matches module paths again at every call, in the model's own layout: name exactly the
  # layers that now hold adapters.
  layers = sorted({_joined(path[:-1]) for path in adapters})
  adapted = qwix.apply_lora_to_model(
      model, _provider(config, "|".join(map(re.escape, layers))), rngs=nnx.Rngs(seed),
      skip_nnx_init=True)
  for path, variable in adapters.items():
    module = adapted
    for key in path[:-1]:
      module = module[key] if isinstance(key, int) else getattr(module, key)
    setattr(module, path[-1], variable)
  return adapted


def split(model: models.MMDiT) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """``(graphdef, adapters, base)`` of a model from `add_adapters`: its ``nnx.LoRAParam``s and
  its other (frozen) ``nnx.Param``s; ``nnx.merge(graphdef, adapters, base)`` rebuilds it."""
  return nnx.split(model, nnx.LoRAParam, nnx.Param)


def merge(base: nnx.State, adapters: nnx.State, config: LoraConfig) -> nnx.State:
  """The plain model's parameters with the adapters folded in: W + (alpha / r) A B.

  Args:
    base: the frozen ``nnx.Param`` state (float32 or any float dtype), as `split` or the plain
      model's ``nnx.split(model, nnx.Param)`` give it.
    adapters: the ``nnx.LoRAParam`` state: ``<name>_lora_a`` [..., prod(in), r] and
      ``<name>_lora_b`` [..., r, prod(out)] beside each adapted kernel ``<name>`` [..., *in,
      *out] (leading ``layers`` axis when stacked).

  Returns:
    ``base``'s structure; adapted kernels in their own dtype, the product taken in float32 at
    the highest matmul precision. Jit-able.

  Raises:
    ValueError: for an adapter without its kernel, or shapes that do not multiply to it.
  """
  weights = dict(nnx.to_flat_state(base))
  factors = dict(nnx.to_flat_state(adapters))
  for path, a in factors.items():
    if not path[-1].endswith(_ADAPTER_A):
      continue
    kernel = path[:-1] + (path[-1][:-len(_ADAPTER_A)],)
    b = factors.get(kernel[:-1] + (kernel[-1] + _ADAPTER_B,))
    w = weights.get(kernel)
    if b is None or w is None or math.prod(a.shape[:-1]) * b.shape[-1] != math.prod(w.shape):
      raise ValueError(f"adapter {_joined(path)} {a.shape} does not match a kernel "
                       f"{None if w is None else w.shape} and factor B "
                       f"{None if b is None else b.shape}")
    delta = jnp.matmul(a.get_value().astype(jnp.float32), b.get_value().astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    value = w.get_value()
    weights[kernel] = w.replace(
        (value.astype(jnp.float32) + config.scale * delta.reshape(w.shape)).astype(value.dtype))
  return nnx.from_flat_state(weights)
