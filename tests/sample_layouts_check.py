"""Sampling on 8 CPU devices, sharded as training is, against one device.

Run by ``tests/test_sample.py`` in a subprocess (the device count is fixed when JAX starts):

  JAX_NUM_CPU_DEVICES=8 python -m tests.sample_layouts_check WORKDIR UNITS.npy [--tpdiff] [--vae]

The sampler restores the autoregressive smoke workdir ``WORKDIR`` (``configs/default.py:smoke``,
pixels, written by ``tests/sample_fixtures.py``) straight into the shardings of a data x fsdp x
sequence x tensor = 1 x 2 x 2 x 2 mesh (``Sampler.from_workdir``) and samples the batch of
``tests/test_sample.py``'s ``batch_units`` there, saving the float32 frame units to
``UNITS.npy`` (the test compares them with its one-device units). With ``--tpdiff`` it also
writes a full-sequence workdir (``configs/tpdiff.py:smoke``) and samples the same prompts on the
first device and on the mesh. Prints one JSON object: per config the mesh, the per-device share
of the parameter bytes and whether every parameter is as sharded as the mesh and rules ask; for
TPDiff also the largest difference of the frame units, their scale and how much the two prompts'
clips differ. ``--vae`` adds the smoke VAE restored into the mesh's shardings, decoding and
encoding against one device."""

from __future__ import annotations

import json
import os
import sys
import tempfile

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from pfm import latent  # noqa: E402
from pfm import parallel  # noqa: E402
from pfm import sample as sample_lib  # noqa: E402
from pfm.models import vae as vae_lib  # noqa: E402
from tests import sample_fixtures  # noqa: E402

MESH = dict(data=1, fsdp=2, sequence=2, tensor=2)
PROMPTS = ["a rabbit on a hill", "a bird"]
NEGATIVE = ["", "blurry"]


def sharded_sampler(workdir: str) -> tuple[sample_lib.Sampler, dict]:
  """The workdir's sampler on `MESH` and a report of its parameters' layout."""
  sampler = sample_lib.Sampler.from_workdir(workdir, mesh=MESH)
  try:
    parallel.check_sharding(sampler._params, sampler.mesh, sampler.rules, min_fsdp_bytes=1 << 12)
    fully_sharded = True
  except ValueError:
    fully_sharded = False
  leaves = jax.tree.leaves(sampler._params)
  per_device = sum(x.addressable_shards[0].data.nbytes for x in leaves)
  return sampler, dict(mesh=dict(sampler.mesh.shape), fully_sharded=fully_sharded,
                       param_share_per_device=per_device / sum(x.nbytes for x in leaves))


def main():
  workdir, output = sys.argv[1:3]
  report = {"num_devices": jax.device_count()}
  kwargs = dict(negative_prompt=NEGATIVE, seed=4, progress=False)
  sampler, report["default"] = sharded_sampler(workdir)
  np.save(output, sampler.generate_units(PROMPTS, num_frames=3, **kwargs))
  if "--tpdiff" in sys.argv[3:]:
    with tempfile.TemporaryDirectory() as root:
      sample_fixtures.write_workdir(sample_fixtures.smoke_config("tpdiff"), root)
      one_device = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1, 1),
                                     parallel.MESH_AXES)
      reference = sample_lib.Sampler.from_workdir(root, mesh=one_device).generate_units(
          PROMPTS, num_frames=4, **kwargs)
      sampler, report["tpdiff"] = sharded_sampler(root)
      units = sampler.generate_units(PROMPTS, num_frames=4, **kwargs)
    report["tpdiff"] |= dict(
        max_abs_difference=float(np.max(np.abs(units - reference))),
        scale=float(np.max(np.abs(reference))),
        prompts_differ=float(np.max(np.abs(reference[0] - reference[1]))))
  if "--vae" in sys.argv[3:]:
    report["vae"] = vae_layout()
  print(json.dumps(report))


def vae_layout() -> dict:
  """The smoke VAE restored into the mesh's shardings (``pfm.latent.load_vae(mesh=...)``): how
  many of its parameters are split, and its decode and encode against one device's."""
  config = vae_lib.vae_config("smoke")
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: vae_lib.CausalVideoVAE(config,
                                                                          rngs=nnx.Rngs(0))))
  params = jax.jit(lambda: nnx.split(vae_lib.CausalVideoVAE(config, rngs=nnx.Rngs(0)))[1])()
  mesh = sample_lib.sampling_mesh({}, MESH)
  with tempfile.TemporaryDirectory() as root:
    latent.save_vae(root, nnx.merge(graphdef, params))
    single, sharded = latent.load_vae(root), latent.load_vae(root, mesh=mesh)
  leaves = jax.tree.leaves(nnx.state(sharded, nnx.Param))
  rng = np.random.default_rng(0)
  z = rng.standard_normal((2, 3, 8, 8, config.latent_channels)).astype(np.float32)
  x = rng.uniform(-1, 1, (2, 5, 16, 16, 3)).astype(np.float32)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  with jax.set_mesh(mesh):
    decoded = sharded.decode(jax.device_put(z, replicated), window=1)
    encoded = sharded.encode(jax.device_put(x, replicated)).mean
  return dict(
      split=sum(any(e is not None for e in leaf.sharding.spec) for leaf in leaves),
      parameters=len(leaves),
      decode_difference=float(np.max(np.abs(np.asarray(decoded)
                                             - np.asarray(single.decode(z, window=1))))),
      encode_difference=float(np.max(np.abs(np.asarray(encoded)
                                             - np.asarray(single.encode(x).mean)))))


if __name__ == "__main__":
  main()
