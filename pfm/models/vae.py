"""The causal video VAE of Pyramid Flow, in Flax NNX.

The autoencoder whose latent space the pyramidal-flow DiT is trained in (Jin et al., ICLR 2025,
Sec. 4 "Implementation details": a MAGVIT-v2-like causal 3D VAE, 8x8 spatial and 8x temporal
compression, 16 latent channels). The layout follows the official implementation's modules
(`CausalVideoVAE` of the Pyramid Flow repository: causal 3D ResNet blocks, strided causal
down-sampling, depth-to-space up-sampling, a per-frame attention mid-block, a diagonal Gaussian
posterior) so that its released weights map onto these parameters one to one.

Conventions: videos are channel-last, [B, T, H, W, C] float, pixels in [-1, 1]; latents are
[B, T', H', W', latent_channels]. A clip of T = 1 + f * k frames, f the temporal factor, becomes
T' = 1 + k latent frames: the first frame is encoded on its own (every temporal convolution is
causal, padded in front with zeros, so latent frame j sees only frames up to j's last) and each
later latent frame summarises f frames. An image is a clip of one frame.

Causality is what makes chunked processing exact: `encode` and `decode` with `window` run the
clip through in causal temporal chunks, each temporal convolution carrying the frames it still
needs into the next chunk (`TemporalContext`), and give the whole-clip result to float rounding.
Spatial tiling (`tile`) is not exact: the mid-block attends over the whole frame and every
convolution sees the tile's border; tiles overlap and are blended linearly (`blend_tiles`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pfm.models.partitioning import param_init

# Conv kernels [kt, kh, kw, in, out]: input channels like a linear layer's "embed", output
# channels like its "mlp", so the model's rules table shards the VAE as it shards the DiT.
CONV_KERNEL_AXES = (None, None, None, "embed", "mlp")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Hyper-parameters of `CausalVideoVAE`; presets by name in `VAE_VARIANTS` / `vae_config`.

  The defaults are the released Pyramid Flow VAE (its `config.json`): 8x spatial and 8x temporal
  compression, 16 latent channels.

  Attributes:
    in_channels: pixel channels (3).
    latent_channels: channels of the latent (16 in the released VAE).
    encoder_channels: output channels of each encoder down block.
    encoder_layers: ResNet blocks per encoder down block.
    spatial_down: per encoder block, whether it halves H and W (after its ResNet blocks).
    temporal_down: per encoder block, whether it halves the frames after the first (causal,
      stride 2).
    decoder_channels: channels of each decoder up block, listed in the encoder's order (the
      decoder runs them reversed, widest first, as the official implementation does).
    decoder_layers: ResNet blocks per decoder up block, in the decoder's (widest-first) order.
    spatial_up: per decoder up block, in the decoder's order, whether it doubles H and W.
    temporal_up: per decoder up block, in the decoder's order, whether it doubles the frames
      (dropping the first of the doubled first frame, so 1 + k frames become 1 + 2k).
    norm_groups: groups of every GroupNorm (applied per frame).
    mid_attention: the per-frame single-head self-attention of both mid-blocks.
    logvar_clamp: (min, max) of the posterior's log-variance (official: (-30, 20)).
    logvar_init: the initial bias of the log-variance half of `quant_conv` (initialisation
      only; 0 as in the official code). With the tiny KL weights of the recipe the posterior
      variance shrinks during training; starting it small (e.g. -6) spares a short run the steps
      that takes.
    image_shift, image_scale: latent normalisation of the first latent frame,
      z_norm = (z - shift) * scale (official SD3-based MM-DiT: 0.1490, 1 / 1.8415; miniFLUX:
      -0.04, 1 / 1.8726).
    video_shift, video_scale: the same for the later latent frames (official: -0.2343,
      1 / 3.0986).
    dtype: compute dtype name (GroupNorm statistics and the attention softmax stay float32).
    param_dtype: parameter dtype name.
  """

  in_channels: int = 3
  latent_channels: int = 16
  encoder_channels: tuple[int, ...] = (128, 256, 512, 512)
  encoder_layers: tuple[int, ...] = (2, 2, 2, 2)
  spatial_down: tuple[bool, ...] = (True, True, True, False)
  temporal_down: tuple[bool, ...] = (True, True, True, False)
  decoder_channels: tuple[int, ...] = (128, 256, 512, 512)
  decoder_layers: tuple[int, ...] = (3, 3, 3, 3)
  spatial_up: tuple[bool, ...] = (True, True, True, False)
  temporal_up: tuple[bool, ...] = (True, True, True, False)
  norm_groups: int = 32
  mid_attention: bool = True
  logvar_clamp: tuple[float, float] = (-30.0, 20.0)
  logvar_init: float = 0.0
  image_shift: float = 0.1490
  image_scale: float = 1 / 1.8415
  video_shift: float = -0.2343
  video_scale: float = 1 / 3.0986
  dtype: str = "float32"
  param_dtype: str = "float32"

  @property
  def spatial_factor(self) -> int:
    """Pixels per latent pixel along H and W (8 in the released VAE)."""
    return 2 ** sum(self.spatial_down)

  @property
  def temporal_factor(self) -> int:
    """Frames per latent frame after the first (8 in the released VAE)."""
    return 2 ** sum(self.temporal_down)

  def latent_frames(self, num_frames: int) -> int:
    """T' = 1 + (T - 1) / f latent frames of a T-frame clip; ValueError unless f divides T - 1."""
    if num_frames < 1 or (num_frames - 1) % self.temporal_factor:
      raise ValueError(
        f"a clip for this VAE has 1 + {self.temporal_factor} * k frames, got {num_frames}")
    return 1 + (num_frames - 1) // self.temporal_factor

  def validate(self) -> None:
    """Raises ValueError naming the first inconsistent field."""
    n = len(self.encoder_channels)
    for name in ("encoder_layers", "spatial_down", "temporal_down"):
      if len(getattr(self, name)) != n:
        raise ValueError(f"vae.{name} needs one entry per encoder block ({n}), "
                         f"got {getattr(self, name)}")
    m = len(self.decoder_channels)
    for name in ("decoder_layers", "spatial_up", "temporal_up"):
      if len(getattr(self, name)) != m:
        raise ValueError(f"vae.{name} needs one entry per decoder block ({m}), "
                         f"got {getattr(self, name)}")
    if sum(self.spatial_up) != sum(self.spatial_down):
      raise ValueError(f"vae.spatial_up {self.spatial_up} must undo vae.spatial_down "
                       f"{self.spatial_down} (as many doublings as halvings)")
    if sum(self.temporal_up) != sum(self.temporal_down):
      raise ValueError(f"vae.temporal_up {self.temporal_up} must undo vae.temporal_down "
                       f"{self.temporal_down}")
    for name in ("encoder_channels", "decoder_channels"):
      for c in getattr(self, name):
        if c % self.norm_groups:
          raise ValueError(f"vae.{name} {getattr(self, name)}: every width must be divisible "
                           f"by vae.norm_groups={self.norm_groups}")
    lo, hi = self.logvar_clamp
    if not lo < hi:
      raise ValueError(f"vae.logvar_clamp must be (min, max) with min < max, got {self.logvar_clamp}")


# Size presets. "pyramid_flow" is the released VAE (about 0.4 B parameters); "tiny" trains on a
# 2-core CPU (4x spatial, 4x temporal, 8 latent channels); "smoke" is for tests.
VAE_VARIANTS: dict[str, dict[str, Any]] = {
  "pyramid_flow": {},
  "tiny": dict(latent_channels=8, encoder_channels=(16, 32, 64), encoder_layers=(1, 1, 1),
               spatial_down=(True, True, False), temporal_down=(True, True, False),
               decoder_channels=(32, 32, 64), decoder_layers=(1, 1, 1),
               spatial_up=(True, True, False), temporal_up=(True, True, False), norm_groups=8),
  "smoke": dict(latent_channels=4, encoder_channels=(8, 16), encoder_layers=(1, 1),
                spatial_down=(True, False), temporal_down=(True, False),
                decoder_channels=(8, 16), decoder_layers=(1, 1), spatial_up=(True, False),
                temporal_up=(True, False), norm_groups=4),
}


def vae_config(variant: str = "tiny", **overrides: Any) -> VAEConfig:
  """The preset `variant` of `VAE_VARIANTS` with `overrides`; KeyError for an unknown name."""
  if variant not in VAE_VARIANTS:
    raise KeyError(f"unknown VAE variant {variant!r}; known: {sorted(VAE_VARIANTS)}")
  fields = {f.name for f in dataclasses.fields(VAEConfig)}
  values = {k: tuple(v) if isinstance(v, list) else v
            for k, v in {**VAE_VARIANTS[variant], **overrides}.items() if k in fields}
  config = VAEConfig(**values)
  config.validate()
  return config


class TemporalContext:
  """The frames each causal temporal convolution carries from one chunk of a clip to the next.

  A causal convolution with temporal kernel k and stride s over a stream of frames needs, after
  a chunk, the frames of its (front-padded) input from its next window's start on. One object
  serves one pass of the network over one chunk: convolutions call `extend` in their fixed call
  order, which prepends what the previous chunk left (zeros for the first chunk: the causal
  padding) and records what the next chunk will need. Run chunk after chunk with
  `TemporalContext(previous.carried)`; one chunk with `TemporalContext()` is the whole clip.

  Attributes:
    first: True for the first chunk of a clip (the one that holds the image frame).
    carried: the frames recorded by this pass, to start the next chunk with.
  """

  def __init__(self, carried: Sequence[jax.Array] | None = None):
    self.first = carried is None
    self._previous = list(carried or ())
    self._next: list[jax.Array] = []

  @property
  def carried(self) -> tuple[jax.Array, ...]:
    return tuple(self._next)

  def extend(self, x: jax.Array, kernel: int, stride: int) -> jax.Array:
    """Prepends the carried (or, first, k - 1 zero) frames to x [B, T, H, W, C]; records the rest."""
    if self.first:
      front = jnp.zeros((x.shape[0], kernel - 1) + x.shape[2:], x.dtype)
    else:
      if not self._previous:
        raise ValueError("TemporalContext: more causal convolutions than carried contexts "
                         "(a chunk must go through the same network as the one before)")
      front = self._previous.pop(0)
    stream = jnp.concatenate([front, x], axis=1)
    windows = max((stream.shape[1] - kernel) // stride + 1, 0)
    self._next.append(stream[:, windows * stride:])
    return stream


class CausalConv3d(nnx.Module):
  """A 3-D convolution, causal in time: front padded with k_t - 1 frames, spatially 'same'.

  Input and output [B, T, H, W, C]; with temporal stride s the output has
  floor((T + k_t - 1 - k_t) / s) + 1 frames (T for s = 1). Source: Pyramid Flow's `CausalConv3d`
  (front padding with zeros; symmetric spatial padding k // 2).

  Parameters: `conv.kernel` [kt, kh, kw, in, out] and `conv.bias` [out].
  """

  def __init__(self, in_channels: int, out_channels: int, kernel: int | Sequence[int] = 3,
               stride: int | Sequence[int] = 1, *, use_bias: bool = True,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
    stride = (stride, 1, 1) if isinstance(stride, int) else tuple(stride)
    if kernel[1] % 2 == 0 or kernel[2] % 2 == 0:
      raise ValueError(f"CausalConv3d: spatial kernel sizes must be odd, got {kernel}")
    self.kernel, self.stride = kernel, stride
    self.conv = nnx.Conv(
      in_channels, out_channels, kernel, stride,
      padding=((0, 0), (kernel[1] // 2, kernel[1] // 2), (kernel[2] // 2, kernel[2] // 2)),
      use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=param_init(nnx.initializers.lecun_normal(), CONV_KERNEL_AXES),
      bias_init=param_init(nnx.initializers.zeros_init(), ("mlp",)), rngs=rngs)

  def __call__(self, x: jax.Array, context: TemporalContext) -> jax.Array:
    return self.apply_kernel(self.extend(x, context), self.conv.kernel[...])

  def extend(self, x: jax.Array, context: TemporalContext) -> jax.Array:
    """x with the k_t - 1 frames in front that the convolution reads (`TemporalContext`)."""
    return context.extend(x, self.kernel[0], self.stride[0]) if self.kernel[0] > 1 else x

  def apply_kernel(self, stream: jax.Array, kernel: jax.Array) -> jax.Array:
    """The convolution of an `extend`ed stream [B, T + k_t - 1, H, W, C] with `kernel` (the
    shape of `conv.kernel`) plus this layer's bias; a function of the kernel, for gradients
    with respect to it alone.

    Computed as a sum over the k_t temporal taps of 2-D convolutions of time-shifted frames:
    the same result as one 3-D convolution and about 3x faster on XLA's CPU backend (measured
    at 64x64x9 frames, 32 channels).
    """
    dtype = self.conv.dtype or stream.dtype
    stream, kernel = stream.astype(dtype), kernel.astype(dtype)
    kt, st = self.kernel[0], self.stride[0]
    frames = (stream.shape[1] - kt) // st + 1
    b = stream.shape[0]
    out = None
    for dt in range(kt):
      shifted = stream[:, dt:dt + (frames - 1) * st + 1:st]
      y = jax.lax.conv_general_dilated(
        shifted.reshape((b * frames,) + stream.shape[2:]), kernel[dt],
        window_strides=self.stride[1:], padding=self.conv.padding[1:],
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
      out = y if out is None else out + y
    out = out.reshape((b, frames) + out.shape[1:])
    return out + self.conv.bias[...].astype(out.dtype) if self.conv.bias is not None else out


class FrameGroupNorm(nnx.Module):
  """GroupNorm over (H, W, channel group) of each frame on its own (Pyramid Flow's
  `CausalGroupNorm`): normalising per frame keeps the encoder causal. [B, T, H, W, C] -> same."""

  def __init__(self, channels: int, groups: int, *, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    self.norm = nnx.GroupNorm(
      channels, num_groups=groups, epsilon=1e-6, dtype=jnp.float32, param_dtype=param_dtype,
      use_fast_variance=False,
      scale_init=param_init(nnx.initializers.ones_init(), ("norm",)),
      bias_init=param_init(nnx.initializers.zeros_init(), ("norm",)), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t = x.shape[:2]
    y = self.norm(x.reshape((b * t,) + x.shape[2:]).astype(jnp.float32))
    return y.reshape(x.shape).astype(x.dtype)


class ResnetBlock(nnx.Module):
  """norm -> SiLU -> causal conv -> norm -> SiLU -> causal conv, plus a (1x1x1 projected when
  the width changes) skip. Pyramid Flow's `CausalResnetBlock3D` (no time embedding, dropout 0)."""

  def __init__(self, in_channels: int, out_channels: int, groups: int, *, dtype: Any,
               param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = FrameGroupNorm(in_channels, groups, param_dtype=param_dtype, rngs=rngs)
    self.conv1 = CausalConv3d(in_channels, out_channels, 3, **kw)
    self.norm2 = FrameGroupNorm(out_channels, groups, param_dtype=param_dtype, rngs=rngs)
    self.conv2 = CausalConv3d(out_channels, out_channels, 3, **kw)
    self.conv_shortcut = (CausalConv3d(in_channels, out_channels, 1, **kw)
                          if in_channels != out_channels else None)

  def __call__(self, x: jax.Array, context: TemporalContext) -> jax.Array:
    h = self.conv1(nnx.silu(self.norm1(x)), context)
    h = self.conv2(nnx.silu(self.norm2(h)), context)
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x, context)
    return x + h


class FrameAttention(nnx.Module):
  """Single-head self-attention over the H * W positions of each frame, with a GroupNorm in
  front and a residual (the mid-block attention of Pyramid Flow's VAE, head size = width)."""

  def __init__(self, channels: int, groups: int, *, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    self.group_norm = FrameGroupNorm(channels, groups, param_dtype=param_dtype, rngs=rngs)

    def linear():
      return nnx.Linear(channels, channels, dtype=dtype, param_dtype=param_dtype,
                        kernel_init=param_init(nnx.initializers.xavier_uniform(), ("embed", "mlp")),
                        bias_init=param_init(nnx.initializers.zeros_init(), ("mlp",)), rngs=rngs)

    self.to_q, self.to_k, self.to_v, self.to_out = linear(), linear(), linear(), linear()

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, h, w, c = x.shape
    y = self.group_norm(x).reshape(b * t, h * w, c)
    q, k, v = self.to_q(y), self.to_k(y), self.to_v(y)
    logits = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = self.to_out(jnp.einsum("nqk,nkc->nqc", weights, v))
    return x + out.reshape(x.shape).astype(x.dtype)


class MidBlock(nnx.Module):
  """ResNet block, per-frame attention, ResNet block (`CausalUNetMidBlock2D`, one layer)."""

  def __init__(self, channels: int, groups: int, attention: bool, *, dtype: Any,
               param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock(channels, channels, groups, **kw) for _ in range(2)])
    self.attention = FrameAttention(channels, groups, **kw) if attention else None

  def __call__(self, x: jax.Array, context: TemporalContext) -> jax.Array:
    x = self.resnets[0](x, context)
    if self.attention is not None:
      x = self.attention(x)
    return self.resnets[1](x, context)


def depth_to_space(x: jax.Array, factor_t: int, factor_s: int) -> jax.Array:
  """Depth to space: [B, T, H, W, C * ft * fs * fs] -> [B, T * ft, H * fs, W * fs, C].

  Channel index c * (ft * fs * fs) + (pt * fs + ph) * fs + pw goes to frame t * ft + pt, row
  h * fs + ph, column w * fs + pw: the `(c p1 p2)` / `(c p)` channel orders of Pyramid Flow's
  `CausalUpsample2x` and `CausalTemporalUpsample2x`.
  """
  b, t, h, w, cf = x.shape
  c = cf // (factor_t * factor_s * factor_s)
  x = x.reshape(b, t, h, w, c, factor_t, factor_s, factor_s)
  x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4)
  return x.reshape(b, t * factor_t, h * factor_s, w * factor_s, c)


def _resnets(in_channels: int, out_channels: int, layers: int, groups: int, kw: dict) -> nnx.List:
  """`layers` ResNet blocks, the first changing the width from in_channels to out_channels."""
  return nnx.List([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, **kw)
                   for i in range(layers)])


class DownBlock(nnx.Module):
  """ResNet blocks, then an optional 2x spatial down-sampling (causal conv, stride (1, 2, 2)),
  then an optional 2x temporal one (causal conv, stride (2, 1, 1)): `DownEncoderBlockCausal3D`."""

  def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int,
               spatial: bool, temporal: bool, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = _resnets(in_channels, out_channels, layers, groups, kw)
    self.spatial = CausalConv3d(out_channels, out_channels, 3, (1, 2, 2), **kw) if spatial else None
    self.temporal = CausalConv3d(out_channels, out_channels, 3, (2, 1, 1), **kw) if temporal else None

  def __call__(self, x: jax.Array, context: TemporalContext) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x, context)
    if self.spatial is not None:
      x = self.spatial(x, context)
    if self.temporal is not None:
      x = self.temporal(x, context)
    return x


class UpBlock(nnx.Module):
  """ResNet blocks, then an optional 2x spatial up-sampling (causal conv to 4x the channels,
  depth to space), then an optional 2x temporal one (causal conv to 2x the channels, depth to
  time, dropping the first frame of the first chunk so 1 + k frames become 1 + 2k):
  `UpDecoderBlockCausal3D`."""

  def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int,
               spatial: bool, temporal: bool, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = _resnets(in_channels, out_channels, layers, groups, kw)
    self.spatial = CausalConv3d(out_channels, 4 * out_channels, 3, **kw) if spatial else None
    self.temporal = CausalConv3d(out_channels, 2 * out_channels, 3, **kw) if temporal else None

  def __call__(self, x: jax.Array, context: TemporalContext) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x, context)
    if self.spatial is not None:
      x = depth_to_space(self.spatial(x, context), 1, 2)
    if self.temporal is not None:
      x = depth_to_space(self.temporal(x, context), 2, 1)
      if context.first:
        x = x[:, 1:]
    return x


class Encoder(nnx.Module):
  """Pixels [B, T, H, W, 3] -> posterior moments [B, T', H', W', 2 * latent_channels]
  (conv_in, down blocks, mid-block, norm, SiLU, conv_out, then the 1x1x1 `quant_conv`)."""

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
    channels, groups = config.encoder_channels, config.norm_groups
    self.conv_in = CausalConv3d(config.in_channels, channels[0], 3, **kw)
    self.down_blocks = nnx.List([
      DownBlock(channels[max(i - 1, 0)], channels[i], config.encoder_layers[i], groups,
                config.spatial_down[i], config.temporal_down[i], **kw)
      for i in range(len(channels))])
    self.mid_block = MidBlock(channels[-1], groups, config.mid_attention, **kw)
    self.conv_norm_out = FrameGroupNorm(channels[-1], groups, param_dtype=kw["param_dtype"],
                                        rngs=rngs)
    self.conv_out = CausalConv3d(channels[-1], 2 * config.latent_channels, 3, **kw)
    self.quant_conv = CausalConv3d(2 * config.latent_channels, 2 * config.latent_channels, 1, **kw)
    if config.logvar_init:
      bias = self.quant_conv.conv.bias
      bias[...] = bias[...].at[config.latent_channels:].set(config.logvar_init)

  def __call__(self, x: jax.Array, context: TemporalContext) -> jax.Array:
    x = self.conv_in(x, context)
    for block in self.down_blocks:
      x = block(x, context)
    x = self.mid_block(x, context)
    x = self.conv_out(nnx.silu(self.conv_norm_out(x)), context)
    return self.quant_conv(x, context)


class Decoder(nnx.Module):
  """Latents [B, T', H', W', latent_channels] -> pixels [B, T, H, W, 3] (the 1x1x1
  `post_quant_conv`, conv_in, mid-block, up blocks widest first, norm, SiLU, conv_out)."""

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
    channels, groups = tuple(reversed(config.decoder_channels)), config.norm_groups
    self.post_quant_conv = CausalConv3d(config.latent_channels, config.latent_channels, 1, **kw)
    self.conv_in = CausalConv3d(config.latent_channels, channels[0], 3, **kw)
    self.mid_block = MidBlock(channels[0], groups, config.mid_attention, **kw)
    self.up_blocks = nnx.List([
      UpBlock(channels[max(i - 1, 0)], channels[i], config.decoder_layers[i], groups,
              config.spatial_up[i], config.temporal_up[i], **kw)
      for i in range(len(channels))])
    self.conv_norm_out = FrameGroupNorm(channels[-1], groups, param_dtype=kw["param_dtype"],
                                        rngs=rngs)
    self.conv_out = CausalConv3d(channels[-1], config.in_channels, 3, **kw)

  def __call__(self, z: jax.Array, context: TemporalContext) -> jax.Array:
    features = self.features(z, context)
    return self.conv_out.apply_kernel(features, self.conv_out.conv.kernel[...]).astype(jnp.float32)

  def features(self, z: jax.Array, context: TemporalContext) -> jax.Array:
    """What the last convolution reads: the normalised, activated features of the last up
    block with their causal front frames, [B, T + 2, H, W, decoder_channels[0]]; the output is
    ``conv_out.apply_kernel(features, conv_out.conv.kernel[...])``."""
    x = self.conv_in(self.post_quant_conv(z, context), context)
    x = self.mid_block(x, context)
    for block in self.up_blocks:
      x = block(x, context)
    return self.conv_out.extend(nnx.silu(self.conv_norm_out(x)), context)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
  """The VAE posterior q(z | x) = N(mean, diag(exp(logvar))), [B, T', H', W', latent_channels].

  `logvar` is clamped to `VAEConfig.logvar_clamp` when it is made (`from_moments`).
  """

  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array, clamp: tuple[float, float] = (-30.0, 20.0)):
    """Splits [..., 2 * c] into the mean (first c channels) and the clamped log-variance."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return cls(mean, jnp.clip(logvar, *clamp))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, key: jax.Array) -> jax.Array:
    """z = mean + std * n, n ~ N(0, I) (the reparameterisation trick)."""
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def kl(self) -> jax.Array:
    """KL(q || N(0, I)) summed over latent frames, pixels and channels: [B], nats."""
    terms = self.mean ** 2 + jnp.exp(self.logvar) - 1.0 - self.logvar
    return 0.5 * terms.reshape(terms.shape[0], -1).sum(-1)


def blend_tiles(length: int, tile: int, overlap: int) -> list[tuple[int, jax.Array]]:
  """Starts and blending weights of overlapping tiles along one axis of `length` positions.

  Tiles of `tile` positions start every `tile - overlap` positions, the last one flush with the
  end. A tile's weight is 1 where it is alone and ramps linearly where it meets a neighbour; the
  weights of all tiles sum to 1 at every position, so inside a shared stretch of n positions the
  output is (1 - a) * left + a * right with a = 1 / (n + 1), ..., n / (n + 1). Returns
  [(start, weights [tile])] in order; one tile of weight 1 when length <= tile.
  """
  if length <= tile:
    return [(0, jnp.ones((length,), jnp.float32))]
  if not 0 <= overlap < tile:
    raise ValueError(f"tile overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
  starts = list(range(0, length - tile, tile - overlap)) + [length - tile]
  tiles = []
  for i, start in enumerate(starts):
    w = jnp.ones((tile,), jnp.float32)
    if i > 0:  # the stretch shared with the previous tile: rising
      n = starts[i - 1] + tile - start
      w = w.at[:n].multiply(jnp.arange(1, n + 1, dtype=jnp.float32) / (n + 1))
    if i < len(starts) - 1:  # the stretch shared with the next tile: falling
      n = start + tile - starts[i + 1]
      w = w.at[tile - n:].multiply(1.0 - jnp.arange(1, n + 1, dtype=jnp.float32) / (n + 1))
    tiles.append((start, w))
  return tiles


def tiled(fn: Callable[[jax.Array], jax.Array], x: jax.Array, tile: int, overlap: int,
          scale: int | float) -> jax.Array:
  """Applies `fn` to overlapping spatial tiles of x [B, T, H, W, C] and blends the outputs.

  `fn` maps a [B, T, h, w, C] tile to [B, T2, h * scale, w * scale, C2] (scale f_s when
  decoding, 1 / f_s when encoding). Tiles are `tile` input positions square and overlap by
  `overlap`; the outputs are blended with `blend_tiles` weights laid out at the output
  resolution, so each seam is a linear cross-fade `overlap * scale` output positions wide.
  `tile * scale` and `overlap * scale` must be whole numbers. Returns float32.
  """
  _, _, h, w, _ = x.shape
  out_tile, out_overlap = tile * scale, overlap * scale
  if out_tile != round(out_tile) or out_overlap != round(out_overlap):
    raise ValueError(f"tile {tile} and overlap {overlap} must be whole at the output "
                     f"resolution (scale {scale})")
  out_tile, out_overlap = round(out_tile), round(out_overlap)
  rows = blend_tiles(round(h * scale), out_tile, out_overlap)
  cols = blend_tiles(round(w * scale), out_tile, out_overlap)
  out = None
  for r0, rw in rows:
    for c0, cw in cols:
      ri, ci = round(r0 / scale), round(c0 / scale)
      y = fn(x[:, :, ri:ri + round(len(rw) / scale), ci:ci + round(len(cw) / scale)])
      if out is None:
        out = jnp.zeros(y.shape[:2] + (round(h * scale), round(w * scale)) + y.shape[4:],
                        jnp.float32)
      weight = rw[:, None] * cw[None, :]
      out = out.at[:, :, r0:r0 + len(rw), c0:c0 + len(cw)].add(
        y.astype(jnp.float32) * weight[None, None, :, :, None])
  return out


class CausalVideoVAE(nnx.Module):
  """Pyramid Flow's causal video VAE: `encode` pixels to a posterior, `decode` latents to pixels.

  Shapes: pixels [B, T, H, W, in_channels] in [-1, 1] with T = 1 + f_t * k and H, W multiples
  of f_s (`VAEConfig.spatial_factor` / `temporal_factor`); latents
  [B, 1 + k, H / f_s, W / f_s, latent_channels]. Parameters are grouped as `encoder/...` and
  `decoder/...` after the official `encoder.*` / `decoder.*` (with `quant_conv` in the encoder and
  `post_quant_conv` in the decoder).
  """

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
    config.validate()
    self.config = config
    self.encoder = Encoder(config, rngs=rngs)
    self.decoder = Decoder(config, rngs=rngs)

  def _check_pixels(self, x: jax.Array) -> None:
    if x.ndim != 5:
      raise ValueError(f"VAE input must be [B, T, H, W, C], got shape {x.shape}")
    self.config.latent_frames(x.shape[1])
    f = self.config.spatial_factor
    if x.shape[2] % f or x.shape[3] % f:
      raise ValueError(f"VAE input height and width must be multiples of {f}, got {x.shape[2:4]}")

  def encode(self, x: jax.Array, *, window: int | None = None,
             tile: int | None = None, tile_overlap: int = 0) -> DiagonalGaussian:
    """q(z | x) of pixels x [B, T, H, W, C].

    Args:
      x: pixels in [-1, 1], T = 1 + f_t * k (ValueError otherwise).
      window: encode in causal temporal chunks of the first 1 + window frames, then `window`
        frames each (a multiple of f_t): exact, for memory. None: the whole clip at once.
      tile: encode in spatial tiles of `tile` pixels overlapping by `tile_overlap` (multiples of
        f_s), blended (`tiled`): approximate, for memory.
    """
    self._check_pixels(x)
    f = self.config.spatial_factor
    if tile is not None and (tile % f or tile_overlap % f):
      raise ValueError(f"encode tile {tile} and tile_overlap {tile_overlap} must be multiples "
                       f"of the spatial factor {f}")
    if window is not None and (window < 1 or window % self.config.temporal_factor):
      raise ValueError(f"encode window must be a positive multiple of the temporal factor "
                       f"{self.config.temporal_factor}, got {window}")

    def moments(frames):
      return _chunked(self.encoder, frames, window)

    if tile is None:
      out = moments(x)
    else:
      out = tiled(moments, x, tile, tile_overlap, 1 / f)
    return DiagonalGaussian.from_moments(out, self.config.logvar_clamp)

  def decode(self, z: jax.Array, *, window: int | None = None,
             tile: int | None = None, tile_overlap: int = 0) -> jax.Array:
    """Pixels [B, 1 + f_t * (T' - 1), H' f_s, W' f_s, C] (float32, unclipped) of latents z.

    Args:
      z: unnormalised latents [B, T', H', W', latent_channels] (`denormalize` first if needed).
      window: decode in causal temporal chunks of the first 1 + window latent frames, then
        `window` each: exact, for memory. None: all at once.
      tile: decode in spatial tiles of `tile` latent pixels overlapping by `tile_overlap`
        latent pixels, blended over tile_overlap * f_s output pixels: approximate, for memory.
    """
    if z.ndim != 5 or z.shape[-1] != self.config.latent_channels:
      raise ValueError(f"latents must be [B, T', H', W', {self.config.latent_channels}], "
                       f"got shape {z.shape}")
    if window is not None and window < 1:
      raise ValueError(f"decode window must be positive, got {window}")

    def pixels(latents):
      return _chunked(self.decoder, latents, window)

    if tile is None:
      return pixels(z)
    return tiled(pixels, z, tile, tile_overlap, self.config.spatial_factor)

  def __call__(self, x: jax.Array, key: jax.Array | None = None
               ) -> tuple[jax.Array, DiagonalGaussian]:
    """Reconstruction of x through a posterior sample (its mean when key is None)."""
    posterior = self.encode(x)
    z = posterior.mean if key is None else posterior.sample(key)
    return self.decode(z), posterior

  def normalize(self, z: jax.Array) -> jax.Array:
    """Latents as the DiT sees them: (z - shift) * scale, the first latent frame with the image
    constants and the rest with the video ones (Pyramid Flow's pipeline). z [B, T', ...]."""
    c = self.config
    return jnp.concatenate([(z[:, :1] - c.image_shift) * c.image_scale,
                            (z[:, 1:] - c.video_shift) * c.video_scale], axis=1)

  def denormalize(self, z: jax.Array) -> jax.Array:
    """The inverse of `normalize`."""
    c = self.config
    return jnp.concatenate([z[:, :1] / c.image_scale + c.image_shift,
                            z[:, 1:] / c.video_scale + c.video_shift], axis=1)


@nnx.jit
def _run_chunk(network: nnx.Module, chunk: jax.Array, carried: tuple[jax.Array, ...] | None):
  """One causal temporal chunk through `network` (`Encoder` or `Decoder`), one compiled call."""
  context = TemporalContext(carried)
  return network(chunk, context), context.carried


def _chunked(network: nnx.Module, x: jax.Array, window: int | None) -> jax.Array:
  """Runs `network` over causal temporal chunks of x [B, T, ...]: the first 1 + window frames,
  then `window` at a time, each chunk one compiled call carrying its causal convolutions'
  context to the next; the whole clip in one call (traceable, no jit of its own) when None."""
  if window is None:
    return network(x, TemporalContext())
  bounds = [0] + list(range(1 + window, x.shape[1], window)) + [x.shape[1]]
  outputs, carried = [], None
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    out, carried = _run_chunk(network, x[:, lo:hi], carried)
    outputs.append(out)
  return jnp.concatenate(outputs, axis=1)
