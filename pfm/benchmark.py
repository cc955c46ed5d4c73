r"""Speed measurements, each a ratio taken in one run on one machine.

  python -m pfm.benchmark --config=configs/default.py --benchmark=sample_cache

``sample_cache``: seconds to sample ``config.sample.num_frames`` frame units with and without the
caption + history key/value cache (``MMDiT.encode_context`` / ``MMDiT.decode``), on the config's
model with captions conditioned on their own clean level (the setting that allows the cache) and
randomly perturbed initial weights (speed does not depend on training).
"""

from __future__ import annotations

import time

from absl import app, flags
import jax
from ml_collections import config_flags
import numpy as np

FLAGS = flags.FLAGS


def sample_cache(config, *, prompt: str = "a benchmark prompt", seed: int = 0) -> dict:
  """Returns ``{"full_s", "cached_s", "speedup"}`` for sampling one video both ways."""
  from pfm import sample, train

  config = config.copy_and_resolve_references()
  config.model.text_time_conditioning = False
  graphdef, state = train.init_state(config)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(p.dtype),
                        state["params"])
  seconds = {}
  for name, cache in (("full_s", False), ("cached_s", True)):
    sampler = sample.Sampler(config, graphdef, params)
    sampler.caches_context = cache
    sampler.generate(prompt, progress=False)  # compile (shapes depend on num_frames)
    start = time.perf_counter()
    sampler.generate(prompt, progress=False)
    seconds[name] = time.perf_counter() - start
  return seconds | {"speedup": seconds["full_s"] / seconds["cached_s"]}


BENCHMARKS = {"sample_cache": sample_cache}


def main(argv):
  del argv
  result = BENCHMARKS[FLAGS.benchmark](FLAGS.config)
  print(f"{FLAGS.benchmark} on {jax.devices()[0].device_kind}:")
  for name, value in result.items():
    print(f"  {name:>10}: {value:.3f}")


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=False)
  flags.DEFINE_enum("benchmark", "sample_cache", list(BENCHMARKS), "What to measure.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
