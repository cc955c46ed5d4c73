r"""Speed measurements, each a ratio taken in one run on one machine.

  python -m pfm.benchmark --config=configs/vanilla.py --benchmark=pyramids
  python -m pfm.benchmark --config=configs/default.py --benchmark=sample_cache
  python -m pfm.benchmark --config=configs/default.py --benchmark=alignment

``pyramids``: on one model (the config's, randomly perturbed initial weights) and the config's clip
size, the sampling time of each pyramid (temporal = TPDiff, spatial, spatiotemporal; 3 stages)
against vanilla full-rate, full-resolution full-sequence sampling with the same total number of
steps (``--steps``, default 30: 10 per stage, TPDiff's Table 3 setting), and the train-step
time per sample averaged over the stages (each stage's batch unpacked, one clip per row, as TPDiff
trains) against vanilla training.
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
import jax.numpy as jnp
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


PYRAMIDS = {  # name -> (spatial, frame-rate schedule, partition)
    "temporal": (False, "2", "1-1-1"),
    "spatial": (True, "", "1-1-1"),
    "spatiotemporal": (True, "2", "1-1-1"),
    "spatiotemporal_2-1-1": (True, "2", "2-1-1"),
}


def _variant(config, spatial: bool, schedule: str, partition: str, total_steps: int):
  """``config`` as a 3-stage full-sequence pyramid (or 1 stage for ``vanilla``)."""
  from pfm.pyramid import stages

  c = config.copy_and_resolve_references()
  c.mode = "full_sequence"
  c.model.text_time_conditioning = False
  vanilla = not spatial and not schedule
  c.pyramid.num_stages = 1 if vanilla else 3
  c.pyramid.spatial, c.pyramid.frame_rate_schedule = spatial, schedule
  c.pyramid.partition = "" if vanilla else partition
  c.pyramid.stage_weights = (1.0,) * c.pyramid.num_stages
  c.sample.steps_per_stage = stages.split_steps(total_steps, c.pyramid.partition,
                                                c.pyramid.num_stages)
  return c


def _train_seconds_per_sample(config, graphdef, state, *, repeats: int, seed: int) -> float:
  """Mean over stages (weights ``stage_weights``) of train-step seconds per clip, one per row."""
  from pfm import config as config_lib
  from pfm import train
  from pfm.data import layout

  pyramid = config_lib.pyramid(config)
  data, p = config.data, config.model.patch_size
  rng = np.random.default_rng(seed)
  frames = rng.uniform(-1, 1, (data.num_frames, data.height, data.width, 3)).astype(np.float32)
  step_fn = train.make_train_step(config, graphdef)
  weights = np.asarray(config.pyramid.stage_weights, np.float64)
  seconds = []
  for k in range(pyramid.num_stages):
    sample = layout.layout_clip(frames, k, pyramid, p)
    rows = data.batch_size
    batch = {name: np.broadcast_to(a, (rows, *a.shape)).copy() for name, a in sample.items()}
    batch["segment_ids"] = np.ones(batch["stage"].shape, np.int32)
    batch["text_tokens"] = rng.integers(2, 258, (rows, data.caption_length)).astype(np.int32)
    batch["text_segment_ids"] = np.ones((rows, data.caption_length), np.int32)
    state_k = jax.tree.map(jnp.copy, state)
    state_k, metrics = step_fn(state_k, batch)  # compile
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      state_k, metrics = step_fn(state_k, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    seconds.append(float(np.median(times)) / rows)
  return float(np.sum(weights * seconds) / weights.sum())


def pyramids(config, *, total_steps: int = 30, repeats: int = 3, train_repeats: int = 5,
             prompt: str = "a benchmark prompt", seed: int = 0) -> dict:
  """Sampling and train-step speedups of each pyramid over vanilla full-sequence diffusion.

  Returns:
    ``{"vanilla_sample_s", "<name>_sample_s", "<name>_sample_speedup", "vanilla_train_ms",
    "<name>_train_ms", "<name>_train_speedup"}`` for the names of ``PYRAMIDS``: sampling seconds
    for one clip of ``config.sample.num_frames`` frames (median of ``repeats``, compiled, with
    classifier-free guidance) and train-step milliseconds per clip.
  """
  from pfm import sample, train

  base = _variant(config, False, "", "", total_steps)
  graphdef, state = train.init_state(base)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(p.dtype),
                        state["params"])
  variants = {"vanilla": base} | {
      name: _variant(config, *spec, total_steps) for name, spec in PYRAMIDS.items()}
  result = {}
  for name, c in variants.items():
    sampler = sample.Sampler(c, graphdef, params)
    sampler.generate(prompt, progress=False)  # compile
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      sampler.generate(prompt, progress=False)
      times.append(time.perf_counter() - start)
    result[f"{name}_sample_s"] = float(np.median(times))
    result[f"{name}_train_ms"] = 1e3 * _train_seconds_per_sample(
        c, graphdef, state, repeats=train_repeats, seed=seed)
  for name in PYRAMIDS:
    result[f"{name}_sample_speedup"] = result["vanilla_sample_s"] / result[f"{name}_sample_s"]
    result[f"{name}_train_speedup"] = result["vanilla_train_ms"] / result[f"{name}_train_ms"]
  return result


BENCHMARKS = {"pyramids": pyramids, "sample_cache": sample_cache, "alignment": alignment}


def main(argv):
  del argv
  result = BENCHMARKS[FLAGS.benchmark](FLAGS.config)
  print(f"{FLAGS.benchmark} on {jax.devices()[0].device_kind}:")
  for name, value in result.items():
    print(f"  {name:>32}: {value:.3f}")


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=False)
  flags.DEFINE_enum("benchmark", "sample_cache", list(BENCHMARKS), "What to measure.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
