"""VAE training: reconstruction metrics, the losses (adaptive weight, hinge, start step), the
perceptual and adversarial networks, the clip pipeline and `pfm.train_vae` as a user runs it."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import ndimage

from configs import vae as vae_config_file
from pfm import errors
from pfm import latent
from pfm import train_vae
from pfm import vae_objective
from pfm.data import clips as clips_lib
from pfm.metrics import reconstruction
from pfm.models import discriminator as disc_lib
from pfm.models import vae as vae_lib


def _frames(seed, shape):
  rng = np.random.default_rng(seed)
  smooth = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(0,) * (len(shape) - 3) + (2, 2, 0))
  return np.clip(smooth * 3, -1, 1).astype(np.float32)


def test_psnr_of_a_known_error():
  x = np.zeros((2, 16, 16, 3), np.float32)
  np.testing.assert_allclose(reconstruction.psnr(x, x + 0.1), 10 * np.log10(4 / 0.01), rtol=1e-5)


def test_ssim_matches_scipy_reference_and_ranks_corruptions():
  """Against Gaussian filtering by scipy (11-tap window, sigma 1.5, valid positions), and lower
  for stronger noise."""
  x = _frames(0, (24, 20, 3))
  y = np.clip(x + np.random.default_rng(1).normal(0, 0.2, x.shape), -1, 1).astype(np.float32)

  def reference(a, b):
    def blur(z):
      return ndimage.gaussian_filter(z, 1.5, truncate=5 / 1.5, mode="constant")[5:-5, 5:-5]
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    out = []
    for ch in range(3):
      p, q = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
      mp, mq = blur(p), blur(q)
      spp, sqq, spq = blur(p * p) - mp ** 2, blur(q * q) - mq ** 2, blur(p * q) - mp * mq
      out.append((((2 * mp * mq + c1) * (2 * spq + c2))
                  / ((mp ** 2 + mq ** 2 + c1) * (spp + sqq + c2))).mean())
    return np.mean(out)

  np.testing.assert_allclose(float(reconstruction.ssim(x, y)), reference(x, y), atol=1e-4)
  assert float(reconstruction.ssim(x, x)) == pytest.approx(1.0, abs=1e-5)
  scores = [float(reconstruction.ssim(x, np.clip(x + np.random.default_rng(2).normal(0, s, x.shape),
                                                  -1, 1))) for s in (0.05, 0.2, 0.5)]
  assert scores[0] > scores[1] > scores[2]
  with pytest.raises(ValueError, match="window"):
    reconstruction.ssim(x[:8, :8], y[:8, :8])


def test_hinge_discriminator_loss():
  real, fake = jnp.array([2.0, 0.5]), jnp.array([-2.0, 0.0])
  # relu(1 - real) = [0, 0.5], relu(1 + fake) = [0, 1]
  assert float(vae_objective.hinge_discriminator_loss(real, fake)) == pytest.approx(0.5 * (0.25 + 0.5))


def _head_problem():
  """A last convolution W on fixed features, as `generator_loss` sees it."""
  conv = vae_lib.CausalConv3d(4, 3, 3, rngs=nnx.Rngs(0))
  x = jnp.asarray(_frames(3, (1, 3, 8, 8, 3)))
  features = conv.extend(jax.random.normal(jax.random.key(1), (1, 3, 8, 8, 4)),
                         vae_lib.TemporalContext())
  disc = disc_lib.PatchDiscriminator(channels=8, num_layers=1, rngs=nnx.Rngs(2))
  return conv, x, features, disc


def test_adaptive_weight_equals_full_gradients_with_respect_to_the_last_layer():
  """The adaptive weight from gradients pulled back through the last convolution only equals
  disc_weight * ||grad_W L_rec|| / (||grad_W L_adv|| + 1e-4) with both gradients taken by
  differentiating each loss with respect to W directly."""
  conv, x, features, disc = _head_problem()
  kernel = conv.conv.kernel[...]
  config = vae_objective.VAELossConfig(disc_weight=0.5, disc_start=0)
  _, metrics = vae_objective.generator_loss(
    x, features, conv.apply_kernel, kernel, jnp.zeros(1), jnp.asarray(1), config,
    discriminator=disc)
  g_rec = jax.grad(lambda w: jnp.mean(jnp.abs(conv.apply_kernel(features, w) - x)))(kernel)
  g_adv = jax.grad(lambda w: -jnp.mean(disc(conv.apply_kernel(features, w))))(kernel)
  expected = 0.5 * np.linalg.norm(g_rec) / (np.linalg.norm(g_adv) + 1e-4)
  np.testing.assert_allclose(float(metrics["d_weight"]), expected, rtol=1e-4)


def test_generator_loss_terms_and_start_step():
  conv, x, features, disc = _head_problem()
  kernel = conv.conv.kernel[...]
  kl = jnp.array([300.0])
  plain = vae_objective.VAELossConfig(kl_weight=1e-3, reconstruction="l2")
  loss, m = vae_objective.generator_loss(x, features, conv.apply_kernel, kernel, kl,
                                         jnp.asarray(1), plain)
  x_hat = conv.apply_kernel(features, kernel)
  np.testing.assert_allclose(float(loss), float(jnp.mean((x_hat - x) ** 2)) + 0.3, rtol=1e-5)
  late = vae_objective.VAELossConfig(disc_weight=0.5, disc_start=5)
  before, mb = vae_objective.generator_loss(x, features, conv.apply_kernel, kernel, kl,
                                            jnp.asarray(4), late, discriminator=disc)
  after, ma = vae_objective.generator_loss(x, features, conv.apply_kernel, kernel, kl,
                                           jnp.asarray(5), late, discriminator=disc)
  assert float(mb["disc_factor"]) == 0.0 and float(ma["disc_factor"]) == 1.0
  np.testing.assert_allclose(float(after) - float(before),
                             float(ma["d_weight"]) * float(ma["g_loss"]), rtol=1e-4, atol=1e-6)
  d_loss, _ = vae_objective.discriminator_loss(x, x_hat, jnp.asarray(4), late, disc)
  assert float(d_loss) == 0.0
  with pytest.raises(ValueError, match="reconstruction"):
    vae_objective.reconstruction_error(x, x, "l3")


def test_lpips_with_random_weights_and_loading():
  """The perceptual hook: zero for equal frames, growing with the corruption; a converted file
  with the official names loads (here: another random network's weights, saved as .npz)."""
  net = disc_lib.LPIPS(rngs=nnx.Rngs(0))
  x = jnp.asarray(_frames(4, (2, 32, 32, 3)))
  assert float(jnp.max(net(x, x))) == pytest.approx(0.0, abs=1e-6)
  noise = np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
  d = [float(jnp.mean(net(x, jnp.clip(x + s * noise, -1, 1)))) for s in (0.1, 0.5)]
  assert 0 < d[0] < d[1]

  other = disc_lib.LPIPS(rngs=nnx.Rngs(1))
  tensors, slice_of = {}, [1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5]
  for i, (conv, s) in enumerate(zip(other.convs, slice_of)):
    tensors[f"net.slice{s}.{i * 2}.weight"] = np.transpose(np.asarray(conv.kernel[...]), (3, 2, 0, 1))
    tensors[f"net.slice{s}.{i * 2}.bias"] = np.asarray(conv.bias[...])
  for i, lin in enumerate(other.lins):
    tensors[f"lin{i}.model.1.weight"] = np.transpose(np.asarray(lin.kernel[...]), (3, 2, 0, 1))
  path = os.path.join(os.environ.get("PYTEST_TMP", "/tmp"), f"lpips_{os.getpid()}.npz")
  np.savez(path, **tensors)
  net.load(path)
  y = jnp.clip(x + 0.3 * noise, -1, 1)
  np.testing.assert_allclose(net(x, y), other(x, y), rtol=1e-5)
  del tensors["lin3.model.1.weight"]
  np.savez(path, **tensors)
  with pytest.raises(KeyError, match="lin3.model.1.weight"):
    net.load(path)
  os.remove(path)


def test_patch_discriminator_shape():
  disc = disc_lib.PatchDiscriminator(channels=8, num_layers=3, rngs=nnx.Rngs(0))
  assert disc(jnp.zeros((2, 3, 64, 64, 3))).shape == (2, 3, 6, 6)


def test_clips_hold_out_the_tail_and_resume():
  """Training clips never touch a video's held-out tail; the evaluation clips come from it;
  the iterator state restores the batches."""
  settings = clips_lib.ClipSettings(height=16, width=16, num_frames=5, batch_size=2,
                                    image_batch_size=1, holdout_fraction=0.25)
  records, _ = clips_lib.load_records(settings)
  first = {r["video"]: clips_lib.training_frames(120 if "carphone" in r["video"] else 0, 0.25)
           for r in records}
  assert first[[k for k in first if "carphone" in k][0]] == 90
  from pfm.data import video
  tails = {r["video"]: video.to_float(np.asarray(video.load_video(r["video"], (16, 16))))
           for r in records}
  heldout = clips_lib.holdout_clips(settings, records, clips_per_video=2)
  assert heldout.shape == (6, 5, 16, 16, 3)
  it = iter(clips_lib.vae_dataset(settings, seed=3, records=records))
  state = it.get_state()
  batches = [next(it) for _ in range(4)]
  assert batches[0]["video"].shape == (2, 5, 16, 16, 3)
  assert batches[0]["image"].shape == (1, 1, 16, 16, 3)
  for batch in batches:
    for clip in batch["video"]:
      # Find the clip (or its mirror image) in a source video: it must start before the tail.
      hits = []
      for frames in tails.values():
        usable = clips_lib.training_frames(len(frames), 0.25)
        for start in range(len(frames) - 4):
          if (np.array_equal(frames[start:start + 5], clip)
              or np.array_equal(frames[start:start + 5, :, ::-1], clip)):
            hits.append(start + 5 <= usable)
      assert hits and all(hits)
  it.set_state(state)
  np.testing.assert_array_equal(next(it)["video"], batches[0]["video"])


def _config(**overrides):
  config = vae_config_file.get_config("smoke")
  config.data.height = config.data.width = 16
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def test_invalid_configs_name_the_field():
  with pytest.raises(errors.ConfigError, match="config.data.num_frames=4"):
    train_vae.validate(_config(**{"data.num_frames": 4}))
  with pytest.raises(errors.ConfigError, match="config.data.height=17"):
    train_vae.validate(_config(**{"data.height": 17}))
  config = _config()
  config.vae.latent_chanels = 4
  with pytest.raises(errors.ConfigError, match="config.vae.latent_chanels"):
    train_vae.validate(config)
  with pytest.raises(errors.ConfigError, match="perceptual_weights"):
    train_vae.validate(_config(**{"loss.perceptual_weight": 1.0}))
  with pytest.raises(errors.ConfigError, match="config.vae"):
    train_vae.validate(_config(**{"vae.variant": "huge"}))


def test_train_step_with_every_loss_term():
  """Perceptual (random LPIPS) and adversarial terms in one step; the discriminator starts at
  its step."""
  run = train_vae.validate(_config(**{"loss.perceptual_weight": 1.0,
                                      "loss.perceptual_weights": "random",
                                      "loss.disc_weight": 0.5, "loss.disc_start": 2,
                                      "loss.disc_layers": 1, "loss.disc_channels": 8}))
  graphdefs, state = train_vae.init_state(run)
  lpips_def, lpips_params = train_vae.perceptual_network(run)
  batch = {"video": jnp.asarray(_frames(5, (2, 5, 16, 16, 3))),
           "image": jnp.asarray(_frames(6, (2, 1, 16, 16, 3)))}
  step = jax.jit(lambda s, b, p: train_vae.train_step(s, b, p, graphdefs=graphdefs,
                                                      lpips_def=lpips_def, run=run))
  disc_before = jax.tree.map(np.asarray, state["disc"])
  state, m1 = step(state, batch, lpips_params)
  assert float(m1["video_disc_factor"]) == 0.0 and float(m1["finite"]) == 1.0
  assert float(m1["video_perceptual"]) > 0
  jax.tree.map(np.testing.assert_array_equal, disc_before, jax.tree.map(np.asarray, state["disc"]))
  state, m2 = step(state, batch, lpips_params)
  assert float(m2["video_disc_factor"]) == 1.0 and float(m2["video_d_weight"]) > 0
  assert float(m2["video_disc_loss"]) > 0
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), disc_before,
                         jax.tree.map(np.asarray, state["disc"]))
  assert any(jax.tree.leaves(changed))


def test_train_vae_runs_resumes_exactly_and_stops_on_nan(tmp_path):
  """The command's loop: checkpoints, reconstructions and scalars; a run stopped at step 3 and
  resumed reaches the parameters of an uninterrupted run; a diverging run stops with a message
  naming the step."""
  straight = train_vae.train_vae(_config(), str(tmp_path / "straight"))
  first = _config(**{"train.num_steps": 3})
  train_vae.train_vae(first, str(tmp_path / "resumed"))
  resumed = train_vae.train_vae(_config(), str(tmp_path / "resumed"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               jax.tree.map(np.asarray, straight["vae"]), jax.tree.map(np.asarray, resumed["vae"]))
  workdir = tmp_path / "straight"
  assert (workdir / "reconstructions" / "step_0000006.png").exists()
  assert (workdir / "reconstructions" / "step_0000006_0.mp4").exists()
  assert json.loads((workdir / "vae.json").read_text())["latent_channels"] == 4
  vae = latent.load_vae(str(workdir))
  x = jnp.asarray(_frames(7, (1, 5, 16, 16, 3)))
  np.testing.assert_allclose(
    train_vae.reconstruct(*nnx.split(vae, nnx.Param), x),
    train_vae.reconstruct(train_vae.init_state(train_vae.validate(_config()))[0][0],
                          straight["vae"], x), atol=1e-5)
  with pytest.raises(train_vae.NonFiniteLossError, match="NaN/inf at step"):
    train_vae.train_vae(_config(**{"train.learning_rate": 1e30, "train.grad_clip": 1e30}),
                        str(tmp_path / "diverged"))
