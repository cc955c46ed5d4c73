"""Networks of the VAE's adversarial and perceptual losses, in Flax NNX.

`PatchDiscriminator`: the PatchGAN of pix2pix (Isola et al., 2017) as the Pyramid Flow VAE recipe
uses it (`NLayerDiscriminator`, instance norm, 4x4 kernels), applied to every frame on its own.

`LPIPS`: the learned perceptual distance of Zhang et al. (2018), VGG-16 variant: unit-normalised
features of five VGG stages, squared differences weighted per channel by 1x1 "lin" layers,
averaged over positions and summed over stages. Its weights cannot be downloaded here:
`LPIPS.load` takes a user's converted file (NumPy ``.npz`` or safetensors with the official
PyTorch names, e.g. ``net.slice1.0.weight``, ``lin0.model.1.weight``); built without one it has
random weights (what the tests use).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pfm.models.text_encoders import _assign


def _conv(cin: int, cout: int, kernel: int, stride: int, padding: int, *, use_bias: bool = True,
          rngs: nnx.Rngs) -> nnx.Conv:
  return nnx.Conv(cin, cout, (kernel, kernel), (stride, stride),
                  padding=((padding, padding), (padding, padding)), use_bias=use_bias,
                  kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


class PatchDiscriminator(nnx.Module):
  """Real/fake logits per patch of each frame: [B, T, H, W, 3] -> [B, T, H', W'] (float32).

  conv(4x4, stride 2) + LeakyReLU(0.2), then `num_layers - 1` of conv(4x4, stride 2) + instance
  norm + LeakyReLU doubling the width (at most 8x), a stride-1 one, and a stride-1 conv to one
  logit. With 64x64 frames and 3 layers, H' = W' = 6.
  """

  def __init__(self, *, channels: int = 64, num_layers: int = 3, rngs: nnx.Rngs):
    self.layers = nnx.List([_conv(3, channels, 4, 2, 1, rngs=rngs)])
    self.norms = nnx.List([])
    width = channels
    for n in range(1, num_layers + 1):
      out = channels * min(2 ** n, 8)
      stride = 2 if n < num_layers else 1
      self.layers.append(_conv(width, out, 4, stride, 1, use_bias=False, rngs=rngs))
      self.norms.append(nnx.GroupNorm(out, num_groups=out, use_scale=False, use_bias=False,
                                      epsilon=1e-5, rngs=rngs))
      width = out
    self.logits = _conv(width, 1, 4, 1, 1, rngs=rngs)

  def __call__(self, frames: jax.Array) -> jax.Array:
    b, t = frames.shape[:2]
    x = frames.reshape((b * t,) + frames.shape[2:])
    x = jax.nn.leaky_relu(self.layers[0](x), 0.2)
    for conv, norm in zip(self.layers[1:], self.norms):
      x = jax.nn.leaky_relu(norm(conv(x)), 0.2)
    logits = self.logits(x)[..., 0].astype(jnp.float32)
    return logits.reshape((b, t) + logits.shape[1:])


# VGG-16 convolution widths per stage; LPIPS taps the ReLU after each stage's last conv.
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# LPIPS's input scaling (its `ScalingLayer`): (x - shift) / scale per RGB channel, x in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class LPIPS(nnx.Module):
  """The LPIPS distance (VGG-16): [..., H, W, 3] pairs in [-1, 1] -> [...] (float32, >= 0).

  Frozen in use: the training step differentiates through it only towards the reconstruction.
  """

  def __init__(self, *, rngs: nnx.Rngs):
    convs, cin = [], 3
    for stage in VGG16_STAGES:
      for cout in stage:
        convs.append(_conv(cin, cout, 3, 1, 1, rngs=rngs))
        cin = cout
    self.convs = nnx.List(convs)
    self.lins = nnx.List([
      nnx.Conv(stage[-1], 1, (1, 1), use_bias=False,
               kernel_init=nnx.initializers.uniform(0.1), rngs=rngs) for stage in VGG16_STAGES])

  def features(self, x: jax.Array) -> list[jax.Array]:
    x = (x - jnp.asarray(LPIPS_SHIFT)) / jnp.asarray(LPIPS_SCALE)
    taps, i = [], 0
    for s, stage in enumerate(VGG16_STAGES):
      if s:
        x = nnx.max_pool(x, (2, 2), (2, 2))
      for _ in stage:
        x = nnx.relu(self.convs[i](x))
        i += 1
      taps.append(x)
    return taps

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    lead = x.shape[:-3]
    x = x.reshape((-1,) + x.shape[-3:]).astype(jnp.float32)
    y = y.reshape((-1,) + y.shape[-3:]).astype(jnp.float32)
    total = 0.0
    for fx, fy, lin in zip(self.features(x), self.features(y), self.lins):
      fx = fx / (jnp.sqrt(jnp.sum(fx ** 2, -1, keepdims=True)) + 1e-10)
      fy = fy / (jnp.sqrt(jnp.sum(fy ** 2, -1, keepdims=True)) + 1e-10)
      total = total + lin((fx - fy) ** 2).mean(axis=(1, 2, 3))
    return total.reshape(lead)

  def load(self, path: str) -> None:
    """Sets the weights from a converted official checkpoint (.npz or .safetensors with the
    PyTorch names: ``net.slice{1..5}.{i}.weight/bias`` for VGG's convs in order and
    ``lin{0..4}.model.1.weight``; kernels [out, in, kh, kw] are transposed here).

    Raises:
      KeyError: naming the first missing tensor; ValueError: naming a tensor of the wrong shape.
    """
    if path.endswith(".safetensors"):
      from safetensors.numpy import load_file
      tensors = load_file(path)
    else:
      tensors = dict(np.load(path))
    conv_keys = sorted((k for k in tensors if k.startswith("net.slice") and k.endswith(".weight")),
                       key=lambda k: (int(k.split(".")[1][len("slice"):]), int(k.split(".")[2])))
    if len(conv_keys) != len(self.convs):
      raise KeyError(f"{path}: {len(conv_keys)} VGG conv weights (net.slice*.*.weight), "
                     f"need {len(self.convs)}")
    for conv, key in zip(self.convs, conv_keys):
      _assign(conv.kernel, np.transpose(tensors[key], (2, 3, 1, 0)), key)
      bias_key = key[:-len("weight")] + "bias"
      if bias_key not in tensors:
        raise KeyError(f"{path}: missing {bias_key}")
      _assign(conv.bias, tensors[bias_key], bias_key)
    for i, lin in enumerate(self.lins):
      key = f"lin{i}.model.1.weight"
      if key not in tensors:
        raise KeyError(f"{path}: missing {key}")
      _assign(lin.kernel, np.transpose(tensors[key], (2, 3, 1, 0)), key)
