"""Models of pfm: the MM-DiT over packed token batches and its parts.

`build_model(config, rngs)` builds an `MMDiT` from an `MMDiTConfig`, a variant name
("smoke", "S", "B", "L", "2B") or a mapping of config fields.
"""

from __future__ import annotations

from pfm.models.attention import (
  ATTENTION_BACKENDS, MaskInfo, dot_product_attention, make_attention_mask)
from pfm.models.mmdit import (
  VARIANTS, MMDiT, MMDiTConfig, build_model, count_params, model_config)
from pfm.models.partitioning import (
  LOGICAL_AXIS_NAMES, logical_to_mesh_axes, with_logical_constraint)

__all__ = [
  "ATTENTION_BACKENDS",
  "LOGICAL_AXIS_NAMES",
  "MMDiT",
  "MMDiTConfig",
  "MaskInfo",
  "VARIANTS",
  "build_model",
  "count_params",
  "dot_product_attention",
  "logical_to_mesh_axes",
  "make_attention_mask",
  "model_config",
  "with_logical_constraint",
]
