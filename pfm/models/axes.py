"""Logical axis names of the model: parameter axes, activation axes and the named layouts.

The one place these names are spelled. Parameters carry them as `out_sharding` metadata and
activations pass through `with_logical_constraint` with them (`pfm.models.partitioning`); a rules
table (`pfm.parallel.DEFAULT_RULES`) maps them onto mesh axes, so the names never name a device.
"""

from __future__ import annotations

# Logical name of the leading axis of stacked (scanned) block parameters.
LAYER_AXIS = "layers"

# Logical names used on parameters.
PARAM_AXES = ("embed", "mlp", "heads", "kv", "vocab", "norm", LAYER_AXIS)

# Logical names used on activations.
ACTIVATION_BATCH = "activation_batch"
ACTIVATION_LENGTH = "activation_length"
ACTIVATION_EMBED = "activation_embed"
ACTIVATION_HEADS = "activation_heads"
ACTIVATION_KV = "activation_kv"
ACTIVATION_MLP = "activation_mlp"
ACTIVATION_AXES = (
  ACTIVATION_BATCH,
  ACTIVATION_LENGTH,
  ACTIVATION_EMBED,
  ACTIVATION_HEADS,
  ACTIVATION_KV,
  ACTIVATION_MLP,
)

LOGICAL_AXIS_NAMES = PARAM_AXES + ACTIVATION_AXES

# Named activation layouts, one logical name (or None: never sharded) per dimension.
# [B, L, D]: the text and video streams and their per-token conditioning.
ACT_EMBED = (ACTIVATION_BATCH, ACTIVATION_LENGTH, ACTIVATION_EMBED)
# [B, L, n_mod, D]: adaLN modulation parameters (shift, scale, gate, ...) per token.
ACT_MODULATION = (ACTIVATION_BATCH, ACTIVATION_LENGTH, None, ACTIVATION_EMBED)
# [B, L, H, Dh]: queries, keys and values.
ACT_HEADS = (ACTIVATION_BATCH, ACTIVATION_LENGTH, ACTIVATION_HEADS, ACTIVATION_KV)
# [B, L, F]: the hidden units of an MLP.
ACT_MLP = (ACTIVATION_BATCH, ACTIVATION_LENGTH, ACTIVATION_MLP)
# [B, L, H, Dh] and [B, L] with whole token sequences per device: what a kernel that XLA cannot
# partition sees of q, k, v and of the mask metadata (`pfm.models.kernels.per_shard`).
ACT_HEADS_WHOLE_LENGTH = (ACTIVATION_BATCH, None, ACTIVATION_HEADS, None)
ACT_TOKENS_WHOLE_LENGTH = (ACTIVATION_BATCH, None)
