"""Hyper-parameters of the MM-DiT (`MMDiTConfig`) and its named size presets (`VARIANTS`).

"2B" is the model of Pyramidal Flow (Jin et al., ICLR 2025, Sec. 4.1 and Appendix B): the MM-DiT
of SD3-Medium (Esser et al., 2024), 24 layers, width 1536, 24 heads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pfm.models.text import TEXT_VOCAB_SIZE


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
  """Hyper-parameters of `MMDiT`; presets by name in `VARIANTS` / `model_config`.

  Attributes:
    patch_size: spatial patch side p of the (already patchified) video tokens.
    channels: channels per pixel; a video token has patch_dim = p * p * channels features.
    width: model width D of both streams.
    depth: number of joint blocks.
    num_heads: attention heads (head size width / num_heads, even).
    mlp_ratio: MLP hidden size / width.
    text_width: width of the byte-level text encoder (and of projected precomputed embeddings).
    text_depth: layers of the byte-level text encoder; 0 builds none (then `text_embed_dim` must
      be set and captions come as precomputed embeddings).
    text_heads: heads of the text encoder.
    text_mlp_ratio: MLP ratio of the text encoder.
    text_vocab_size: caption vocabulary (bytes + 2 specials = 258).
    text_embed_dim: feature size of precomputed caption embeddings from a frozen encoder, or
      None to disable that input.
    pooled_embed_dim: feature size of a pooled caption embedding from frozen encoders (SD3:
      the two CLIP towers' projected outputs, 768 + 1280 = 2048), given per text token
      (`TextTokens.pooled`); it replaces the mean of the caption features as the pooled
      conditioning. None: the mean of the caption features.
    time_frequency_dim: sinusoidal features of the noise level.
    time_scale: t in [0, 1] is embedded as sinusoidal(t * time_scale).
    position_max_period: longest wavelength of the spatial sinusoidal embedding, patch units.
    rope_theta: base of the temporal RoPE.
    norm_epsilon: epsilon of the adaLN LayerNorms.
    dtype: compute dtype name, e.g. "float32" or "bfloat16": the dtype of matmuls and of the
      activations between them. Normalisation statistics, attention logits and softmax, RoPE and
      sinusoidal angles, and the final layer (hence the output) are float32 whatever it is.
    param_dtype: parameter dtype name (keep "float32" for bfloat16 mixed precision: parameters,
      their gradients and optimizer state stay float32).
    attention_backend: key of `pfm.models.kernels.ATTENTION_BACKENDS`.
    text_time_conditioning: modulate the text stream with the segment's current noise level
      (SD3). With False a caption is conditioned on its own level, clean (t = 1), so caption and
      history tokens do not depend on the sampling time and their keys/values can be computed
      once per stage (`MMDiT.encode_context` / `MMDiT.decode`).
    scan_layers: store the first depth - 1 joint blocks stacked, every parameter with a leading
      axis of size depth - 1 named `axes.LAYER_AXIS` ("layers"), and run them with one
      `jax.lax.scan`, so trace and compile time do not grow with depth. The last block (its text
      stream is pre-only) stays separate. Parameter paths change: `blocks/<i>/...` becomes
      `blocks/...` (stacked, blocks 0..depth-2) and `last_block/...`; `stacking.stack_layers` /
      `stacking.unstack_layers` convert between the layouts. Outputs are those of the unstacked
      model with the same parameters (the initial values drawn from one seed differ between
      layouts).
    remat_policy: gradient checkpointing of every joint block (`jax.checkpoint`), by name:
      "none": no checkpointing, the backward pass reads every saved activation;
      "full": save only each block's inputs and recompute the whole block in the backward pass
      (least memory, about one extra forward of the blocks);
      "dots": save the outputs of matmuls without batch dimensions (the QKV, output, MLP and
      modulation projections) and recompute the rest (norms, activations, attention);
      "dots_all": save every matmul output, the float32 attention logits [B, H, Lq, Lk] and the
      attention-weighted values included (more memory than "dots", less recomputation).
      Values and gradients do not depend on the policy (`stacking.REMAT_POLICIES`). Unknown
      names raise ValueError when the model is built.
    output_head: how video tokens become pixels: "patch" (DiT / SD3: each token's final linear
      layer gives its own p x p patch) or "overlap" (each token gives a 2p x 2p window, blended
      with its neighbours' by a tent, so the output has no seams on the patch grid;
      `pfm.models.overlap`; needs an even patch size).
    single_blocks: single-stream blocks after the joint blocks (FLUX, Labs 2024; Pyramid Flow's
      miniFLUX): text and video share one set of weights, attention and MLP run in parallel
      from one modulated LayerNorm. 0 (SD3's MM-DiT) builds none; then the last joint block's
      text stream is pre-only.
    qk_norm_epsilon: epsilon of the RMS QK-normalisation (SD3's Pyramid Flow: 1e-5; FLUX: 1e-6).
    position_embedding: how spatial positions enter: "sincos" (a 2-D sinusoidal embedding of the
      token's exact, possibly fractional, position, added to the patch embedding), "table" (SD3:
      a `position_table_size`^2 table of sinusoids centre-cropped to the current unit's grid and
      bilinearly resampled for a lower-resolution history unit; Pyramid Flow's
      `interp_condition_pos`), or "none" (positions enter only through a 3-axis RoPE).
    position_table_size: side of the "table" grid (SD3's `pos_embed_max_size`).
    position_table_base: grid side whose positions run 0, 1, 2, ... in the "table" (SD3's
      `sample_size / patch_size`); the table's position step is base / size.
    rope_axes: head features given to each RoPE axis: () rotates the whole head by the temporal
      position alone; (d_t, d_row, d_col), summing to the head size, rotates d_t features by the
      temporal position and the others by the (row, col) position (FLUX's 3-axis RoPE, Pyramid
      Flow miniFLUX: (16, 24, 24)). Text tokens are at position 0 on every axis.
    time_input: what the noise-level embedding reads: "data" embeds sinusoidal(t * time_scale)
      (t = 1 is data); "noise" embeds sinusoidal((1 - t) * time_scale), the diffusers / Pyramid
      Flow timestep that counts noise at 1000.
    conditioning: "token": every token is conditioned on its own noise level (history and
      current unit differ); "sample": every token of a packed sample, text and video, takes its
      caption's conditioning (the current unit's noise level plus the pooled caption), as SD3
      and Pyramid Flow's released models compute one embedding per sample.
    text_causal_block: the causal block of caption tokens in the joint attention:
      `masks.TEXT_CAUSAL_BLOCK` (-1: captions see only captions, every video token sees them) or
      0 (Pyramid Flow's released models: captions and the oldest frame unit see each other).
    text_projection_only: precomputed caption embeddings reach the model width through
      `text_projection` alone (Pyramid Flow's `context_embedder`, one Linear); needs
      text_width == width. False adds pfm's `context_embed` after it.
  """

  patch_size: int = 2
  channels: int = 3
  width: int = 64
  depth: int = 2
  num_heads: int = 2
  mlp_ratio: float = 4.0
  text_width: int = 32
  text_depth: int = 1
  text_heads: int = 2
  text_mlp_ratio: float = 4.0
  text_vocab_size: int = TEXT_VOCAB_SIZE
  text_embed_dim: int | None = None
  pooled_embed_dim: int | None = None
  time_frequency_dim: int = 256
  time_scale: float = 1000.0
  position_max_period: float = 10_000.0
  rope_theta: float = 10_000.0
  norm_epsilon: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_backend: str = "xla"
  text_time_conditioning: bool = True
  scan_layers: bool = False
  remat_policy: str = "none"
  output_head: str = "patch"
  single_blocks: int = 0
  qk_norm_epsilon: float = 1e-6
  position_embedding: str = "sincos"
  position_table_size: int = 192
  position_table_base: int = 64
  rope_axes: tuple[int, ...] = ()
  time_input: str = "data"
  conditioning: str = "token"
  text_causal_block: int = -1
  text_projection_only: bool = False

  def validate_options(self) -> None:
    """Checks the released-model options (module docstring of each field).

    Raises:
      ValueError: naming the field, for an unknown position embedding, time input or
        conditioning, RoPE axes that are not 3 even sizes summing to the head size,
        text_projection_only without a matching text width, or negative single_blocks.
    """
    for name, value, known in (("position_embedding", self.position_embedding,
                                POSITION_EMBEDDINGS), ("time_input", self.time_input,
                                TIME_INPUTS), ("conditioning", self.conditioning,
                                CONDITIONINGS)):
      if value not in known:
        raise ValueError(f"{name}={value!r} is not one of {known}.")
    if self.rope_axes and (len(self.rope_axes) != 3 or sum(self.rope_axes) != self.head_dim
                           or any(d % 2 for d in self.rope_axes)):
      raise ValueError(f"rope_axes={tuple(self.rope_axes)} must be 3 even sizes (frame, row, "
                       f"col) summing to the head size {self.head_dim}.")
    if self.text_projection_only and (self.text_embed_dim is None
                                      or self.text_width != self.width):
      raise ValueError("text_projection_only needs text_embed_dim and text_width == width.")
    if self.single_blocks < 0:
      raise ValueError(f"single_blocks must be >= 0, got {self.single_blocks}.")

  @property
  def patch_dim(self) -> int:
    """P = patch_size^2 * channels, the feature size of a video token."""
    return self.patch_size * self.patch_size * self.channels

  @property
  def output_dim(self) -> int:
    """Features of the final layer per token: patch_dim, or (2p)^2 * channels for "overlap"."""
    return self.patch_dim * (4 if self.output_head == "overlap" else 1)

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


OUTPUT_HEADS = ("patch", "overlap")
POSITION_EMBEDDINGS = ("sincos", "table", "none")
TIME_INPUTS = ("data", "noise")
CONDITIONINGS = ("token", "sample")

# Size presets. "2B" is the paper's model: SD3-Medium's MM-DiT, 24 layers, width 1536, 24 heads.
VARIANTS: dict[str, dict[str, Any]] = {
  "smoke": dict(width=64, depth=2, num_heads=2, text_width=32, text_depth=1, text_heads=2),
  "XS": dict(width=128, depth=4, num_heads=2, text_width=128, text_depth=1, text_heads=2),
  "S": dict(width=256, depth=6, num_heads=4, text_width=256, text_depth=2, text_heads=4),
  "B": dict(width=512, depth=12, num_heads=8, text_width=256, text_depth=4, text_heads=4),
  "L": dict(width=1024, depth=16, num_heads=16, text_width=512, text_depth=6, text_heads=8),
  "2B": dict(width=1536, depth=24, num_heads=24, text_width=768, text_depth=12, text_heads=12),
}


def model_config(variant: str = "smoke", **overrides: Any) -> MMDiTConfig:
  """The preset `variant` (a key of `VARIANTS`) with field overrides.

  Raises:
    ValueError: for an unknown variant. TypeError: for an unknown field.
  """
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r}; known: {list(VARIANTS)}.")
  return MMDiTConfig(**{**VARIANTS[variant], **overrides})
