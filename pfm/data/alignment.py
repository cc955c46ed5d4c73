r"""Data-noise alignment of TPDiff (Ran & Shou, Algorithm 1, Sec. 3.3; cost in Appendix A.2).

TPDiff needs the noise of a stage to stay nearly constant along the stage's ODE path so that
Eq. (9) reduces to Eq. (10) and the stage's noise can be read off its end points, Eq. (11).
Following Li et al. (2024) it pre-assigns noise draws to data samples per batch by minimising
the total distance between data-noise pairs (Algorithm 1):

  assign <- scipy.optimize.linear_sum_assignment(cdist(x, eps))   (euclidean, one row per sample)
  eps'   <- eps[assign]

``align_noise`` is that assignment; ``aligned_batch_noise`` applies it to a packed token batch of
``pfm.data.pipeline`` and ``AlignNoise`` is the grain ``RandomMap`` that adds the result to the
batch as ``"noise"`` (float32 ``[B, L, P]``, one standard normal draw per token).

Where it runs: on the host, in the input pipeline (on CPU, as in the paper, Appendix A.2), because
the assignment needs the noise and the clean data side by side and a Hungarian solve has no
useful accelerator form. Each host aligns only its own local batch; that is what makes it work per
host in a multi-host run, exactly like the paper's per-GPU batches (the coupling is within a
batch, never across hosts, and no communication is needed).

What changes and what does not: ``eps'`` is a permutation of i.i.d. N(0, I) draws, so the set of
draws in a batch is unchanged (pooled over the samples, the noise is exactly N(0, I) whatever the
data) and, when the samples that exchange noise are exchangeable (drawn i.i.d., as the pipeline
does), the marginal distribution of each sample's noise is still exactly N(0, I). The diffusion
equations (forward process, targets, loss) are therefore unchanged; only the coupling between
data and noise changes (given its data, a sample's noise is pulled toward it).

Only samples whose target blocks have identical shapes can exchange noise: within a packed batch
samples are grouped by (pyramid stage, number of target tokens) and each group of two or more is
aligned separately. History tokens (clean condition, corrupted on device with their own level)
and padding keep their independent draws.
"""

from __future__ import annotations

import grain
import numpy as np
from scipy import optimize
from scipy.spatial import distance


def align_noise(clean, noise) -> np.ndarray:
  """Optimal assignment of noise draws to data samples (TPDiff Algorithm 1).

  Args:
    clean: ``[N, ...]`` float array, one data sample per row (flattened per sample internally).
    noise: ``[N, ...]`` float array of the same shape, one noise draw per row.

  Returns:
    int64 ``[N]`` permutation ``perm`` such that ``noise[perm]`` is the noise assigned to
    ``clean``: row ``i`` gets ``noise[perm[i]]``, and ``perm`` minimises
    ``sum_i ||clean_i - noise[perm[i]]||_2`` (euclidean, not squared, as in the paper).
    ``N = 1`` gives ``[0]``, ``N = 0`` an empty array.

  Raises:
    ValueError: if ``clean`` and ``noise`` differ in shape or are 0-dimensional.
  """
  clean, noise = np.asarray(clean), np.asarray(noise)
  if clean.shape != noise.shape or clean.ndim == 0:
    raise ValueError(f"align_noise: clean {clean.shape} and noise {noise.shape} must have the "
                     "same shape [N, ...]")
  n = clean.shape[0]
  if n <= 1:
    return np.arange(n, dtype=np.int64)
  cost = distance.cdist(clean.reshape(n, -1), noise.reshape(n, -1), "euclidean")
  rows, cols = optimize.linear_sum_assignment(cost)
  perm = np.empty(n, np.int64)
  perm[rows] = cols  # rows is already 0..N-1 for a square cost; keep it explicit
  return perm


def aligned_batch_noise(batch, rng: np.random.Generator) -> np.ndarray:
  """Draws the noise of a packed token batch, aligned to the data per (stage, token count).

  The unaligned draw is ``rng.standard_normal((B, L, P), dtype=np.float32)`` (one draw per token,
  padding and history included). A sample is a (row, segment id > 0) pair; its target block is
  its tokens with ``is_target == 1`` in token order. Samples of all rows with the same stage and
  the same number of target tokens form a group; in each group of two or more, ``align_noise``
  between the flattened clean target blocks and the noise target blocks reassigns the noise
  blocks among the group's samples. Everything else keeps the unaligned draw.

  Args:
    batch: dict of NumPy arrays (``pfm.data.pipeline`` layout) with at least
      ``clean_end`` float32 ``[B, L, P]`` (clean tokens in [-1, 1]),
      ``segment_ids`` int32 ``[B, L]`` (1..S packed sample, 0 = padding),
      ``stage`` int32 ``[B, L]`` (stage of the token's sample) and
      ``is_target`` int32 ``[B, L]`` (1 = supervised token of the current unit).
    rng: NumPy generator; the result is a deterministic function of its state and ``batch``.

  Returns:
    float32 ``[B, L, P]`` standard normal noise, target blocks permuted within groups.

  Raises:
    ValueError: if the fields' shapes disagree or one sample's target tokens have different
      stages.
  """
  clean = np.asarray(batch["clean_end"])
  segment_ids = np.asarray(batch["segment_ids"])
  stage = np.asarray(batch["stage"])
  is_target = np.asarray(batch["is_target"])
  if clean.ndim != 3:
    raise ValueError(f"aligned_batch_noise: clean_end must be [B, L, P], got {clean.shape}")
  num_rows, length, _ = clean.shape
  for name, field in (("segment_ids", segment_ids), ("stage", stage), ("is_target", is_target)):
    if field.shape != (num_rows, length):
      raise ValueError(f"aligned_batch_noise: {name} must be [B, L] = {(num_rows, length)}, "
                       f"got {field.shape}")
  noise = rng.standard_normal(clean.shape, dtype=np.float32)

  # Target tokens as flat indices into [B * L], ordered by sample then token position.
  seg = segment_ids.reshape(-1).astype(np.int64)
  tokens = np.flatnonzero((seg > 0) & (is_target.reshape(-1) == 1))
  if tokens.size == 0:
    return noise
  sample_key = (tokens // length) * (int(seg.max()) + 1) + seg[tokens]
  order = np.argsort(sample_key, kind="stable")  # stable: keeps token order within a sample
  tokens = tokens[order]
  _, starts, counts = np.unique(sample_key[order], return_index=True, return_counts=True)
  token_stage = stage.reshape(-1)[tokens]
  sample_stage = token_stage[starts]
  if np.any(token_stage != np.repeat(sample_stage, counts)):
    raise ValueError("aligned_batch_noise: the target tokens of one sample have different stages")

  groups, group_of = np.unique(np.stack([sample_stage, counts], axis=1), axis=0,
                               return_inverse=True)
  group_of = group_of.reshape(-1)
  clean_flat = clean.reshape(num_rows * length, -1)
  noise_flat = noise.reshape(num_rows * length, -1)  # a view: writes land in ``noise``
  for g, (_, count) in enumerate(groups):
    members = np.flatnonzero(group_of == g)
    if members.size < 2:
      continue
    index = tokens[starts[members][:, None] + np.arange(count)]  # [G, count] flat token indices
    perm = align_noise(clean_flat[index], noise_flat[index])
    noise_flat[index] = noise_flat[index[perm]]
  return noise


class AlignNoise(grain.transforms.RandomMap):
  """grain transform: adds ``"noise"`` = ``aligned_batch_noise(batch, rng)`` to a packed batch.

  Apply it to batches (after packing and batching), e.g.
  ``dataset.random_map(AlignNoise(), seed=seed)``, so grain's per-element generator makes the
  noise deterministic and checkpointable with the iterator. Returns a new dict; the input batch
  is not modified.
  """

  def random_map(self, element, rng: np.random.Generator):
    return {**element, "noise": aligned_batch_noise(element, rng)}
