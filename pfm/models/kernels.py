"""Attention kernels over one mask description (`MaskInfo`) and their registry by name.

Every kernel consumes the token metadata of `pfm.models.masks.MaskInfo` (Pyramidal Flow
Sec. 3.4: blockwise causal attention over packed samples) and returns exactly zero for a query
that sees no key, in value and in gradient. Backends (keys of `ATTENTION_BACKENDS`, chosen by the
config field `model.attention`):

  * `"xla"`: einsum attention on the dense mask (`masks.make_attention_mask`); any platform.
  * `"dot_product"`: `jax.nn.dot_product_attention(implementation="xla")` given the dense mask;
    any platform. Same wrapper as `"cudnn"` (`jax_nn_attention`), so its mask handling is
    exercised where cuDNN is absent.
  * `"cudnn"`: `jax.nn.dot_product_attention(implementation="cudnn")` (cuDNN flash attention),
    NVIDIA GPUs only. The boolean mask becomes an additive bias inside jax; computation is in
    bfloat16 or float16 (float32 inputs are cast to bfloat16 and the output cast back).
  * `"splash"`: Pallas TPU splash attention with a dynamic (traced) block-sparse mask, TPU only;
    `splash_attention(..., interpret=True)` runs the same kernel in Pallas interpret mode on
    any platform, slowly (tests only).

`check_backend` tells, before compilation, whether a backend name can run on a platform;
`dot_product_attention` runs the backend named by a config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from pfm.models.axes import ACT_HEADS_WHOLE_LENGTH, ACT_TOKENS_WHOLE_LENGTH
from pfm.models.masks import MaskInfo, open_empty_rows, zero_empty_rows
from pfm.models.partitioning import current_rules, logical_to_mesh_axes


def xla_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskInfo, *, scale: float
) -> jax.Array:
  """Plain einsum attention with a dense mask; logits and softmax in float32.

  Fully masked query rows (padding) give exactly zero output, never NaN, in value and gradient.

  Args:
    q: [B, Lq, H, D] queries, compute dtype.
    k: [B, Lk, H, D] keys.
    v: [B, Lk, H, D] values.
    mask: the token metadata of queries and keys.
    scale: logit scale, usually D ** -0.5.

  Returns:
    [B, Lq, H, D] in v's dtype.
  """
  logits = jnp.einsum(
    "bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  allowed = mask.dense()
  logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(allowed, probs, 0.0)  # Zeroes fully masked rows.
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _pad_tokens(
  q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskInfo, lq: int, lk: int
) -> tuple[jax.Array, jax.Array, jax.Array, MaskInfo]:
  """Pads queries to length lq and keys/values to lk with zeros and segment id 0 (masked out).

  Padded keys are invisible to every query; padded queries see no key, so their outputs are
  zeroed and must be sliced off by the caller.
  """

  def pad(x: jax.Array, length: int) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, length - x.shape[1])
    return jnp.pad(x, widths)

  if lq != q.shape[1]:
    q = pad(q, lq)
    mask = mask.replace(q_segment_ids=pad(mask.q_segment_ids, lq),
                        q_causal_blocks=pad(mask.q_causal_blocks, lq))
  if lk != k.shape[1]:
    k, v = pad(k, lk), pad(v, lk)
    mask = mask.replace(
      kv_segment_ids=pad(mask.kv_segment_ids, lk), kv_causal_blocks=pad(mask.kv_causal_blocks, lk))
  return q, k, v, mask


def jax_nn_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: MaskInfo,
  *,
  scale: float,
  implementation: str = "xla",
  compute_dtype: Any = None,
  length_multiple: int = 1,
) -> jax.Array:
  """Masked attention through `jax.nn.dot_product_attention` given the dense boolean mask.

  The mask is `make_attention_mask` with key 0 opened for rows that see no key (see
  `open_empty_rows`); those rows are zeroed after the call, so they are exactly zero, never NaN, in
  value and gradient, whatever the implementation does with a fully masked row.

  Args:
    q: [B, Lq, H, D] queries.
    k: [B, Lk, H, D] keys, same dtype as q.
    v: [B, Lk, H, D] values, same dtype as q.
    mask: token metadata of queries and keys; Lq may differ from Lk.
    scale: logit scale, usually D ** -0.5.
    implementation: `"xla"` or `"cudnn"`, passed to `jax.nn.dot_product_attention`.
    compute_dtype: dtype q, k, v are cast to for the call (None: keep theirs); the output is
      cast back to v's dtype.
    length_multiple: Lq and Lk are padded up to a multiple of this (masked, sliced off after).

  Returns:
    [B, Lq, H, D] in v's dtype; rows of queries that see no key are zero.

  Raises:
    ValueError: from `jax.nn.dot_product_attention` for mismatched shapes or dtypes, or an
      unsupported implementation.
  """
  out_dtype, lq, lk = v.dtype, q.shape[1], k.shape[1]
  q, k, v, mask = _pad_tokens(
    q, k, v, mask, _round_up(lq, length_multiple), _round_up(lk, length_multiple))
  if compute_dtype is not None:
    q, k, v = (x.astype(compute_dtype) for x in (q, k, v))
  kernel_mask, has_key = open_empty_rows(mask)
  out = jax.nn.dot_product_attention(
    q, k, v, mask=kernel_mask, scale=scale, implementation=implementation)
  return zero_empty_rows(out, has_key)[:, :lq].astype(out_dtype)


CUDNN_MAX_HEAD_DIM = 256  # Hopper and later; 128 before (jax raises NotImplementedError then).


def cudnn_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskInfo, *, scale: float
) -> jax.Array:
  """cuDNN flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`), NVIDIA only.

  What the installed jax (0.10) supports on this path and how it is met here:
    * masking: a boolean mask is turned by jax into an additive bias of a large negative number
      ([B, 1, Lq, Lk] in the compute dtype, materialised; its gradient is computed by cuDNN and
      discarded). There is no segment or block-sparse interface through `jax.nn`, so packed
      segments and blockwise causality both go through the dense mask.
    * dtypes: bfloat16 or float16 only. float32 inputs are cast to bfloat16 (accumulation and
      softmax are float32 inside cuDNN) and the output is cast back to float32, so results carry
      bfloat16 rounding of q, k, v.
    * head_dim: a multiple of 8, at most 256 (Hopper and later) or 128 (earlier GPUs).
    * lengths: Lq != Lk is supported; with a bias in training both must be even, so they are
      padded to even lengths with masked tokens.
    * rows that see no key are zeroed after the call (see `jax_nn_attention`).
  Source: `jax.nn.dot_product_attention` and its checks in `jax._src.cudnn.
  fused_attention_stablehlo` (`check_layout`, `check_is_flash_attention`), jax 0.10.

  Args:
    q: [B, Lq, H, D]; k, v: [B, Lk, H, D], one floating dtype.
    mask: token metadata of queries and keys.
    scale: logit scale.

  Returns:
    [B, Lq, H, D] in v's dtype.

  Raises:
    ValueError: if D is not a multiple of 8 or exceeds `CUDNN_MAX_HEAD_DIM`.
    RuntimeError, NotImplementedError: from jax when cuDNN is absent or the GPU is unsupported
      (`check_backend` catches the platform case before compilation).
  """
  head_dim = q.shape[-1]
  if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
    raise ValueError(
      f"cudnn attention needs a head dim that is a multiple of 8 and at most "
      f"{CUDNN_MAX_HEAD_DIM}; got {head_dim}.")
  compute_dtype = None if q.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
  return jax_nn_attention(
    q, k, v, mask, scale=scale, implementation="cudnn", compute_dtype=compute_dtype,
    length_multiple=2)


def dot_product_xla_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskInfo, *, scale: float
) -> jax.Array:
  """`jax_nn_attention` with `implementation="xla"`, input dtype kept; any platform.

  Args/returns as `xla_attention`.
  """
  return jax_nn_attention(q, k, v, mask, scale=scale, implementation="xla")


SPLASH_LANES = 128  # Splash block sizes are multiples of this (the TPU lane count).


def _splash_block(length: int, block: int) -> int:
  """Largest of block, block / 2, ... (at least 128) dividing length rounded up to 128."""
  padded = _round_up(length, SPLASH_LANES)
  while padded % block:
    block //= 2
  return block


def _concrete_dynamic_flag(kernel: Any) -> Any:
  """Keeps the kernel's `is_dynamic_mask` flag a Python bool.

  The installed splash module passes every field of its mask info through `jnp.array`, flag
  included; built from a traced mask inside `jax.jit` the flag becomes a traced array, and the
  kernel's `__call__`, which branches on it to name its scope, raises TracerBoolConversionError.
  The flag only selects that name, and a traced mask is dynamic, so it is set back to True.
  """
  info = kernel.fwd_mask_info
  if not isinstance(info.is_dynamic_mask, bool):
    kernel.fwd_mask_info = info._replace(is_dynamic_mask=True)
  return kernel


def splash_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: MaskInfo,
  *,
  scale: float,
  block_q: int = 512,
  block_kv: int = 512,
  interpret: bool = False,
) -> jax.Array:
  """Pallas TPU splash attention with the mask given as a dynamic (traced) array.

  The installed jax (0.10) offers `make_splash_mha(mask, ...)` where mask may be a jax array
  [heads, Lq, Lk] (dynamic mask): it is tiled into (block_q, block_kv) blocks; all-false blocks
  are skipped, all-true blocks run unmasked and the others read their mask tile. Segment ids
  (`SegmentIds`) exist too but are not used: the dense mask already carries the packing segments,
  and splash's segment test would let padding (id 0) attend to padding. The kernel takes no scale,
  so q is multiplied by `scale` first. One kernel is built per batch element (`jax.vmap`) with a
  single mask head shared by all heads, layout [H, L, D].

  Block sizes must divide the lengths: Lq and Lk are padded with masked tokens (segment id 0) to
  a multiple of the block actually used, the largest of block, block / 2, ... (at least 128)
  dividing the length rounded up to 128, so at most 127 padding tokens are added; the padding is
  sliced off. Rows that see no key get key 0 in the kernel mask and are zeroed after the kernel
  (see `open_empty_rows`): splash divides by a zero softmax denominator in rows whose blocks are all
  skipped. Memory: the dense mask is materialised per batch element, three times (forward, dq and
  dkv tilings), Lq * Lk bytes each. Source: `jax.experimental.pallas.ops.tpu.splash_attention`
  (`make_splash_mha`, `_process_dynamic_mask`), jax 0.10.

  Args:
    q: [B, Lq, H, D] queries.
    k: [B, Lk, H, D] keys, same dtype as q.
    v: [B, Lk, H, D] values.
    mask: token metadata of queries and keys; Lq may differ from Lk.
    scale: logit scale.
    block_q: query block size (forward, dq and dkv kernels): 128 times a power of two.
    block_kv: key block size: 128 times a power of two.
    interpret: run the kernel in Pallas interpret mode (any platform, slow).

  Returns:
    [B, Lq, H, D] in v's dtype; rows of queries that see no key are zero.

  Raises:
    ValueError: if a block size is not 128 times a power of two.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  for name, block in (("block_q", block_q), ("block_kv", block_kv)):
    ratio = block // SPLASH_LANES
    if block % SPLASH_LANES or ratio & (ratio - 1):
      raise ValueError(f"splash {name} must be 128 times a power of two; got {block}.")
  out_dtype, lq, lk = v.dtype, q.shape[1], k.shape[1]
  bq, bkv = _splash_block(lq, block_q), _splash_block(lk, block_kv)
  q, k, v, mask = _pad_tokens(q, k, v, mask, _round_up(lq, bq), _round_up(lk, bkv))
  kernel_mask, has_key = open_empty_rows(mask)
  block_sizes = splash.BlockSizes(
    block_q=bq, block_kv=bkv, block_kv_compute=bkv,
    block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
    block_q_dq=bq, block_kv_dq=bkv)

  def one(q: jax.Array, k: jax.Array, v: jax.Array, m: jax.Array) -> jax.Array:
    # q [H, Lq, D], k and v [H, Lk, D], m bool [1, Lq, Lk] -> [H, Lq, D].
    kernel = splash.make_splash_mha_single_device(
      m, block_sizes=block_sizes, interpret=interpret)
    return _concrete_dynamic_flag(kernel)(q, k, v)

  def heads_first(x: jax.Array) -> jax.Array:  # [B, L, H, D] <-> [B, H, L, D]
    return jnp.swapaxes(x, 1, 2)

  out = jax.vmap(one)(heads_first(q * scale), heads_first(k), heads_first(v), kernel_mask)
  return zero_empty_rows(heads_first(out), has_key)[:, :lq].astype(out_dtype)


AttentionFn = Callable[..., jax.Array]


def per_shard(attention_fn: AttentionFn) -> AttentionFn:
  """Runs a kernel that XLA cannot partition on each device's rows and heads (`jax.shard_map`).

  A Pallas kernel is an opaque custom call to XLA's SPMD partitioner. Under a mesh with logical
  axis rules (`jax.set_mesh` + `nnx.logical_axis_rules`) the wrapped function sees only its
  device's batch rows (``activation_batch``) and heads (``activation_heads``) with whole token
  sequences: a sequence-sharded input is gathered first, so attention stays exact. Without a
  mesh or rules it is ``attention_fn`` itself.

  Args:
    attention_fn: ``fn(q, k, v, mask, *, scale) -> [B, Lq, H, D]``.

  Returns:
    a function of the same signature.
  """
  def wrapped(q, k, v, mask: MaskInfo, *, scale: float) -> jax.Array:
    mesh = jax.sharding.get_abstract_mesh()
    rules = current_rules()
    if mesh.empty or not rules:
      return attention_fn(q, k, v, mask, scale=scale)
    heads = logical_to_mesh_axes(ACT_HEADS_WHOLE_LENGTH, rules, mesh.axis_names)
    tokens = logical_to_mesh_axes(ACT_TOKENS_WHOLE_LENGTH, rules, mesh.axis_names)
    mask_specs = MaskInfo(tokens, tokens, tokens, tokens)
    return jax.shard_map(
      lambda q, k, v, m: attention_fn(q, k, v, m, scale=scale), mesh=mesh,
      in_specs=(heads, heads, heads, mask_specs), out_specs=heads, check_vma=False)(q, k, v, mask)

  return wrapped


# Backend name -> fn(q, k, v, mask: MaskInfo, *, scale) -> [B, Lq, H, D].
ATTENTION_BACKENDS: dict[str, AttentionFn] = {
  "xla": xla_attention,
  "dot_product": dot_product_xla_attention,
  "cudnn": cudnn_attention,  # jax partitions cuDNN attention over batch and heads itself
  "splash": per_shard(splash_attention),
}
# Backend name -> the `jax.default_backend()` platforms it runs on; absent: any platform.
BACKEND_PLATFORMS: dict[str, tuple[str, ...]] = {
  "cudnn": ("gpu", "cuda"),
  "splash": ("tpu",),
}
_PLATFORM_NEEDS = {"cudnn": "an NVIDIA GPU with cuDNN", "splash": "a TPU"}


def check_backend(name: str, platform: str | None = None) -> None:
  """Checks, before compilation, that the attention backend `name` exists and runs on `platform`.

  `"xla"` and `"dot_product"` run anywhere; `"cudnn"` needs platform "gpu" (or "cuda"): a ROCm
  GPU, which jax also reports as "gpu", is not told apart and fails later in jax; `"splash"`
  needs "tpu". Splash's interpret mode, which runs elsewhere, is reachable only by calling
  `splash_attention(..., interpret=True)` directly, never from the config.

  Args:
    name: the config field `model.attention`.
    platform: a `jax.default_backend()` name ("cpu", "gpu", "tpu", ...); None: the current one.

  Raises:
    ValueError: naming `model.attention`, for an unknown backend or one the platform lacks.
  """
  if name not in ATTENTION_BACKENDS:
    raise ValueError(
      f"model.attention={name!r} is not an attention backend; choose one of "
      f"{sorted(ATTENTION_BACKENDS)}.")
  platform = (platform or jax.default_backend()).lower()
  needed = BACKEND_PLATFORMS.get(name)
  if needed is not None and platform not in needed:
    portable = sorted(n for n in ATTENTION_BACKENDS if n not in BACKEND_PLATFORMS)
    raise ValueError(
      f"model.attention={name!r} needs {_PLATFORM_NEEDS.get(name, ' or '.join(needed))}; "
      f"this platform is {platform}. Use one of {portable} here.")


def dot_product_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: MaskInfo,
  *,
  backend: str = "xla",
  scale: float | None = None,
) -> jax.Array:
  """Masked multi-head attention through the backend named `backend`.

  Args:
    q: [B, Lq, H, D]; k, v: [B, Lk, H, D], compute dtype.
    mask: token metadata defining the mask (see `make_attention_mask`).
    backend: a key of `ATTENTION_BACKENDS`.
    scale: logit scale, default D ** -0.5.

  Returns:
    [B, Lq, H, D]; rows of fully masked queries are zero.

  Raises:
    ValueError: for an unknown backend.
  """
  if backend not in ATTENTION_BACKENDS:
    raise ValueError(
      f"Unknown attention backend {backend!r}; known: {sorted(ATTENTION_BACKENDS)}.")
  if scale is None:
    scale = q.shape[-1] ** -0.5
  return ATTENTION_BACKENDS[backend](q, k, v, mask, scale=scale)
