r"""Speed measurements, each a ratio taken in one run on one machine.

  python -m pfm.benchmark --config=configs/default.py --benchmark=sample_cache

``sample_cache``: seconds to sample ``config.sample.num_frames`` frame units with and without the
caption + history key/value cache (``MMDiT.encode_context`` / ``MMDiT.decode``), on the config's
model with captions conditioned on their own clean level (the setting that allows the cache) and
randomly perturbed initial weights (speed does not depend on training).
``alignment``: milliseconds per ``pfm.data.alignment.align_noise`` call (host CPU, median) for
batches of 4, 8 and 16 of the config's clips and of TPDiff's AnimateDiff latents, with Table A.1's.
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


def alignment(config, *, repeats: int = 20, seed: int = 0) -> dict:
  """Times TPDiff's data-noise alignment (``align_noise``, Algorithm 1) on the host CPU.

  Per batch size B in (4, 8, 16) and per-sample size D in (the config's full-resolution clip,
  ``num_frames * height * width * 3``; TPDiff's AnimateDiff latent, 16 x 4 x 64 x 64 = 262144):
  float32 clean data U[-1, 1] and standard normal noise of shape [B, D]
  (``np.random.default_rng(seed)``), one warm-up call, then the median of ``repeats`` calls.

  Returns:
    ``{"ms_batch{B}_d{D}": ms}`` for each pair, plus the paper's Table A.1 latencies
    ``{"paper_ms_batch4": 5.1, "paper_ms_batch8": 9.6, "paper_ms_batch16": 17.8}`` (their
    hardware and sample size, for reference), all floats.
  """
  from pfm.data import alignment as alignment_lib

  data = config.data
  sizes = dict.fromkeys((int(data.num_frames * data.height * data.width * 3), 16 * 4 * 64 * 64))
  rng = np.random.default_rng(seed)
  result = {}
  for size in sizes:
    for batch in (4, 8, 16):
      clean = rng.uniform(-1, 1, (batch, size)).astype(np.float32)
      noise = rng.standard_normal((batch, size), dtype=np.float32)
      alignment_lib.align_noise(clean, noise)  # warm-up
      seconds = []
      for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        alignment_lib.align_noise(clean, noise)
        seconds.append(time.perf_counter() - start)
      result[f"ms_batch{batch}_d{size}"] = 1e3 * float(np.median(seconds))
  return result | {"paper_ms_batch4": 5.1, "paper_ms_batch8": 9.6, "paper_ms_batch16": 17.8}


BENCHMARKS = {"sample_cache": sample_cache, "alignment": alignment}


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
