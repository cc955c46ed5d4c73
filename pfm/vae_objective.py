"""The losses of the causal video VAE: reconstruction + KL, perceptual, adversarial.

The recipe of Pyramid Flow's VAE (its `LPIPSWithDiscriminator`, after Esser et al., 2021,
"Taming Transformers", Eq. 7), on pixels in [-1, 1]:

  L_G = w_pix * rec(x, x^) + w_lpips * LPIPS(x, x^) + w_kl * KL(q(z|x) || N(0, I))
        + lambda * f(step) * (-mean D(x^))
  L_D = f(step) * 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x^)))       (hinge)

rec is the mean absolute error ("l1") or squared error ("l2", what the official code uses) per
pixel; KL is summed over a clip's latent and averaged over clips; f(step) = 1 from
``disc_start`` on and 0 before; lambda is the adaptive weight

  lambda = disc_weight * clip(||grad_W L_rec|| / (||grad_W L_adv|| + 1e-4), 0, 1e4),

W the decoder's last convolution kernel, L_rec the perceptual-and-pixel part and L_adv the
generator term (no gradient flows through lambda). The gradients with respect to W are taken
exactly and cheaply: both losses' gradients with respect to the output x^ are pulled back
through the last convolution only (one weight-gradient convolution each).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class VAELossConfig:
  """Weights of `generator_loss` / `discriminator_loss` (hashable, closed over by jit).

  Attributes:
    reconstruction: "l1" (mean absolute error) or "l2" (mean squared error).
    pixel_weight: w_pix.
    kl_weight: w_kl (official: 1e-12).
    perceptual_weight: w_lpips; 0 without a perceptual network.
    disc_weight: the adaptive weight's scale (official: 0.5); 0 turns the adversarial term off.
    disc_start: first step with the adversarial terms (official: 250000).
  """

  reconstruction: str = "l1"
  pixel_weight: float = 1.0
  kl_weight: float = 1e-6
  perceptual_weight: float = 0.0
  disc_weight: float = 0.0
  disc_start: int = 0


def reconstruction_error(x: jax.Array, x_hat: jax.Array, kind: str) -> jax.Array:
  """Mean absolute ("l1") or squared ("l2") error over every pixel; ValueError otherwise."""
  diff = x_hat.astype(jnp.float32) - x.astype(jnp.float32)
  if kind == "l1":
    return jnp.mean(jnp.abs(diff))
  if kind == "l2":
    return jnp.mean(diff ** 2)
  raise ValueError(f"vae_loss.reconstruction must be 'l1' or 'l2', got {kind!r}")


def hinge_discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x^))) (Lim & Ye, 2017)."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def adaptive_weight(rec_grad_w: jax.Array, adv_grad_w: jax.Array, disc_weight: float) -> jax.Array:
  """disc_weight * clip(||g_rec|| / (||g_adv|| + 1e-4), 0, 1e4), without gradient."""
  ratio = jnp.linalg.norm(rec_grad_w.ravel()) / (jnp.linalg.norm(adv_grad_w.ravel()) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, 1e4) * disc_weight)


def generator_loss(x: jax.Array, features: jax.Array, head: Callable[[jax.Array, jax.Array], jax.Array],
                   kernel: jax.Array, kl: jax.Array, step: jax.Array, config: VAELossConfig, *,
                   perceptual: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
                   discriminator: Callable[[jax.Array], jax.Array] | None = None,
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L_G of one batch of clips and its parts.

  Args:
    x: the clips, [B, T, H, W, C] in [-1, 1].
    features: the input of the decoder's last convolution (already front-padded in time).
    head: head(features, kernel) -> x^, the last convolution with a given kernel.
    kernel: that convolution's kernel W (the adaptive weight's reference layer).
    kl: KL(q || N(0, I)) per clip, [B].
    step: the current (1-based) step, for ``disc_start``.
    config: the weights.
    perceptual: LPIPS-like distance [..., H, W, C] pairs -> [...], or None.
    discriminator: frames [B, T, H, W, C] -> logits, or None.

  Returns:
    (L_G, metrics): the scalar loss and its float32 parts (rec, kl, perceptual, g_loss,
    d_weight, disc_factor).
  """
  x_hat = head(features, kernel)

  def rec_loss(x_hat):
    loss = config.pixel_weight * reconstruction_error(x, x_hat, config.reconstruction)
    if perceptual is not None and config.perceptual_weight:
      p = jnp.mean(perceptual(x, x_hat))
      return loss + config.perceptual_weight * p, p
    return loss, jnp.zeros((), jnp.float32)

  rec, p_loss = rec_loss(x_hat)
  kl_loss = jnp.mean(kl)
  metrics = {"rec": reconstruction_error(x, x_hat, config.reconstruction), "kl": kl_loss,
             "perceptual": p_loss}
  total = rec + config.kl_weight * kl_loss
  if discriminator is not None and config.disc_weight:
    disc_factor = (step >= config.disc_start).astype(jnp.float32)

    def adv_loss(x_hat):
      return -jnp.mean(discriminator(x_hat))

    g_loss = adv_loss(x_hat)
    # Gradients of both terms with respect to W, through the last convolution only.
    out = jax.lax.stop_gradient(x_hat)
    d_rec = jax.grad(lambda o: rec_loss(o)[0])(out)
    d_adv = jax.grad(adv_loss)(out)
    _, pull_back = jax.vjp(lambda w: head(jax.lax.stop_gradient(features), w), kernel)
    d_weight = adaptive_weight(pull_back(d_rec)[0], pull_back(d_adv)[0], config.disc_weight)
    total = total + d_weight * disc_factor * g_loss
    metrics |= {"g_loss": g_loss, "d_weight": d_weight, "disc_factor": disc_factor}
  return total, metrics


def discriminator_loss(x: jax.Array, x_hat: jax.Array, step: jax.Array, config: VAELossConfig,
                       discriminator: Callable[[jax.Array], jax.Array]
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L_D on real clips x and (gradient-stopped) reconstructions x^; zero before disc_start."""
  logits_real = discriminator(x)
  logits_fake = discriminator(jax.lax.stop_gradient(x_hat))
  disc_factor = (step >= config.disc_start).astype(jnp.float32)
  loss = disc_factor * hinge_discriminator_loss(logits_real, logits_fake)
  return loss, {"disc_loss": loss, "logits_real": jnp.mean(logits_real),
                "logits_fake": jnp.mean(logits_fake)}
