"""Tests for pfm.data.alignment: TPDiff's data-noise alignment (Algorithm 1)."""

from __future__ import annotations

import itertools

import grain
import numpy as np
import pytest

from pfm.data import alignment


def _total_distance(clean, noise, perm):
  """sum_i ||clean_i - noise[perm[i]]||_2 over flattened rows."""
  n = clean.shape[0]
  return float(np.linalg.norm(clean.reshape(n, -1) - noise[perm].reshape(n, -1), axis=1).sum())


# ---------------------------------------------------------------------------------------------
# align_noise.


def test_align_noise_is_optimal_against_brute_force():
  rng = np.random.default_rng(0)
  for _ in range(5):
    clean = rng.uniform(-1, 1, (5, 7))
    noise = rng.standard_normal((5, 7))
    perm = alignment.align_noise(clean, noise)
    assert perm.dtype == np.int64 and sorted(perm.tolist()) == list(range(5))
    best = min(_total_distance(clean, noise, np.array(p)) for p in itertools.permutations(range(5)))
    aligned = _total_distance(clean, noise, perm)
    assert aligned == pytest.approx(best, rel=1e-12)
    assert aligned <= _total_distance(clean, noise, np.arange(5)) + 1e-12


def test_align_noise_multidimensional_rows_match_flattened():
  rng = np.random.default_rng(1)
  clean = rng.uniform(-1, 1, (6, 2, 3, 4)).astype(np.float32)
  noise = rng.standard_normal((6, 2, 3, 4)).astype(np.float32)
  np.testing.assert_array_equal(alignment.align_noise(clean, noise),
                                alignment.align_noise(clean.reshape(6, -1), noise.reshape(6, -1)))


def test_align_noise_reduces_mean_distance():
  rng = np.random.default_rng(2)
  aligned, unaligned = [], []
  for _ in range(200):
    clean = rng.uniform(-1, 1, (8, 16))
    noise = rng.standard_normal((8, 16))
    perm = alignment.align_noise(clean, noise)
    aligned.append(_total_distance(clean, noise, perm))
    unaligned.append(_total_distance(clean, noise, np.arange(8)))
  assert np.all(np.array(aligned) <= np.array(unaligned) + 1e-12)
  assert np.mean(aligned) < np.mean(unaligned)


def test_align_noise_edge_cases():
  assert alignment.align_noise(np.ones((1, 4)), np.zeros((1, 4))).tolist() == [0]
  with pytest.raises(ValueError):
    alignment.align_noise(np.ones((3, 4)), np.ones((3, 5)))
  with pytest.raises(ValueError):
    alignment.align_noise(np.ones((3, 4)), np.ones((2, 4)))


def _moment_errors(samples):
  """Returns (mean, cov - I) of ``samples`` [M, D] and their standard errors under N(0, I)."""
  m, d = samples.shape
  mean = samples.mean(axis=0)
  second = samples.T @ samples / m  # E[x x^T] with the known mean 0
  # Under N(0, I): Var(x_a) = 1, Var(x_a^2) = 2, Var(x_a x_b) = 1 for a != b.
  mean_se = np.full(d, 1 / np.sqrt(m))
  cov_se = np.where(np.eye(d, dtype=bool), np.sqrt(2 / m), np.sqrt(1 / m))
  return mean, second - np.eye(d), mean_se, cov_se


def test_aligned_noise_stays_standard_normal():
  """What is true, and tested here (draws of N = 4 noise rows in D = 3 per batch):

  1. Fresh clean data per batch with i.i.d. rows (here U[0, 1]^D, deliberately not centred): the
     rows are exchangeable and the assignment is permutation-equivariant, so EACH row of the
     aligned noise is marginally N(0, I): per-row mean ~0 and E[eps eps^T] ~I within 5 standard
     errors of the 2000-draw estimates.
  2. Fixed clean data: the aligned noise is a permutation of the i.i.d. draws, so the noise
     POOLED over the rows of a batch has exactly the statistics of the unaligned draws (and is
     therefore N(0, I)); but the CONDITIONAL law of a row given the data is not N(0, I): it is
     pulled toward that row's data, sum_i <x_i, eps'_i> having a clearly positive mean (for the
     unaligned draws it has mean 0).
  """
  n, d, draws, z = 4, 3, 2000, 5.0
  rng = np.random.default_rng(3)

  # 1. Marginal over fresh i.i.d. data: every row is N(0, I).
  rows = np.empty((draws, n, d))
  for t in range(draws):
    clean = rng.uniform(0, 1, (n, d))
    noise = rng.standard_normal((n, d))
    rows[t] = noise[alignment.align_noise(clean, noise)]
  for i in range(n):
    mean, cov_err, mean_se, cov_se = _moment_errors(rows[:, i])
    assert np.all(np.abs(mean) < z * mean_se), (i, mean)
    assert np.all(np.abs(cov_err) < z * cov_se), (i, cov_err)

  # 2. Fixed data: pooled statistics equal the unaligned draws' and are N(0, I); the coupling
  # with the data is positive.
  clean = rng.uniform(-1, 1, (n, d))
  aligned, unaligned, coupling = [], [], []
  for _ in range(draws):
    noise = rng.standard_normal((n, d))
    shuffled = noise[alignment.align_noise(clean, noise)]
    aligned.append(shuffled)
    unaligned.append(noise)
    coupling.append(np.sum(clean * shuffled))
  aligned = np.concatenate(aligned)
  unaligned = np.concatenate(unaligned)
  np.testing.assert_allclose(aligned.mean(0), unaligned.mean(0), atol=1e-12)
  np.testing.assert_allclose(aligned.T @ aligned, unaligned.T @ unaligned, rtol=1e-12)
  mean, cov_err, mean_se, cov_se = _moment_errors(aligned)  # n * draws i.i.d. draws pooled
  assert np.all(np.abs(mean) < z * mean_se), mean
  assert np.all(np.abs(cov_err) < z * cov_se), cov_err
  # Unaligned: sum_i <x_i, eps_i> has mean 0 and standard deviation ||x||_F.
  coupling_se = np.linalg.norm(clean) / np.sqrt(draws)
  assert np.mean(coupling) > z * coupling_se, (np.mean(coupling), coupling_se)


# ---------------------------------------------------------------------------------------------
# aligned_batch_noise on a packed batch.

# Hand-built packed batch, B = 2 rows of L = 12 tokens. Each entry: (row, segment id, stage,
# number of history tokens, number of target tokens); tokens follow in this order, rest padding.
_SAMPLES = (
    (0, 1, 0, 1, 2),  # A: stage 0, 2 targets, 1 history token
    (0, 2, 1, 0, 2),  # D: stage 1, 2 targets
    (0, 3, 0, 0, 2),  # B: stage 0, 2 targets
    (1, 1, 0, 0, 2),  # C: stage 0, 2 targets
    (1, 2, 1, 1, 2),  # E: stage 1, 2 targets, 1 history token
    (1, 3, 0, 0, 1),  # F: stage 0, 1 target (alone in its group)
)
_B, _L, _P = 2, 12, 3


def _packed_batch():
  """Returns (batch with random clean_end, {sample name: flat target token indices})."""
  segment_ids = np.zeros((_B, _L), np.int32)
  stage = np.zeros((_B, _L), np.int32)
  is_target = np.zeros((_B, _L), np.int32)
  fill = [0] * _B
  targets = {}
  for name, (row, seg, k, history, count) in zip("ADBCEF", _SAMPLES):
    start = fill[row]
    segment_ids[row, start:start + history + count] = seg
    stage[row, start:start + history + count] = k
    is_target[row, start + history:start + history + count] = 1
    targets[name] = row * _L + np.arange(start + history, start + history + count)
    fill[row] += history + count
  clean = np.random.default_rng(10).uniform(-1, 1, (_B, _L, _P)).astype(np.float32)
  batch = {"clean_end": clean, "segment_ids": segment_ids, "stage": stage,
           "is_target": is_target}
  return batch, targets


def _reference_noise(seed):
  """The unaligned draw ``aligned_batch_noise`` starts from for this seed."""
  return np.random.default_rng(seed).standard_normal((_B, _L, _P), dtype=np.float32)


def test_aligned_batch_noise_follows_the_optimal_assignment():
  """Clean target blocks set to other samples' unaligned noise blocks make the optimal
  assignment known (cost 0): A <- B <- C <- A within (stage 0, 2 tokens), D <-> E within
  (stage 1, 2 tokens); F is alone in (stage 0, 1 token) even though its data equals a stage-0
  2-token sample's noise token."""
  seed = 4
  batch, targets = _packed_batch()
  reference = _reference_noise(seed).reshape(_B * _L, _P)
  clean = batch["clean_end"].reshape(_B * _L, _P)
  source = {"A": "B", "B": "C", "C": "A", "D": "E", "E": "D"}
  for name, other in source.items():
    clean[targets[name]] = reference[targets[other]]
  clean[targets["F"]] = reference[targets["A"][:1]]

  noise = alignment.aligned_batch_noise(batch, np.random.default_rng(seed))
  assert noise.dtype == np.float32 and noise.shape == (_B, _L, _P)
  expected = reference.copy()
  for name, other in source.items():
    expected[targets[name]] = reference[targets[other]]
  np.testing.assert_array_equal(noise.reshape(_B * _L, _P), expected)


def test_aligned_batch_noise_permutes_within_groups_only():
  seed = 5
  batch, targets = _packed_batch()
  noise = alignment.aligned_batch_noise(batch, np.random.default_rng(seed)).reshape(_B * _L, _P)
  reference = _reference_noise(seed).reshape(_B * _L, _P)

  # History and padding tokens, and the lone sample F, keep exactly the unaligned draw.
  aligned = np.concatenate([targets[name] for name in "ABCDE"])
  others = np.setdiff1d(np.arange(_B * _L), aligned)
  assert np.all(np.isin(targets["F"], others)) and others.size == _B * _L - aligned.size
  np.testing.assert_array_equal(noise[others], reference[others])

  # Within each group the set of noise blocks is preserved: stages never exchange noise, and a
  # sample's block moves as a whole (its tokens stay together, in order).
  for group in ("ABC", "DE"):
    got = sorted(noise[targets[name]].tobytes() for name in group)
    want = sorted(reference[targets[name]].tobytes() for name in group)
    assert got == want, group
  # The aligned assignment is at least as close to the data as the unaligned one.
  clean = batch["clean_end"].reshape(_B * _L, _P)
  def distance(group, n):
    return sum(np.linalg.norm(clean[targets[name]] - n[targets[name]]) for name in group)

  for group in ("ABC", "DE"):
    assert distance(group, noise) <= distance(group, reference) + 1e-5

  # Deterministic for the seed; a different seed gives different noise.
  again = alignment.aligned_batch_noise(batch, np.random.default_rng(seed)).reshape(_B * _L, _P)
  np.testing.assert_array_equal(noise, again)
  other = alignment.aligned_batch_noise(batch, np.random.default_rng(seed + 1))
  assert not np.array_equal(noise, other.reshape(_B * _L, _P))


def test_aligned_batch_noise_rejects_bad_batches():
  batch, _ = _packed_batch()
  with pytest.raises(ValueError):
    alignment.aligned_batch_noise(batch | {"stage": batch["stage"][:, :-1]},
                                  np.random.default_rng(0))
  stage = batch["stage"].copy()
  stage[0, 2] = 1  # second target token of sample A
  with pytest.raises(ValueError):
    alignment.aligned_batch_noise(batch | {"stage": stage}, np.random.default_rng(0))


def test_aligned_batch_noise_all_padding():
  batch, _ = _packed_batch()
  batch = batch | {"segment_ids": np.zeros((_B, _L), np.int32)}
  noise = alignment.aligned_batch_noise(batch, np.random.default_rng(6))
  np.testing.assert_array_equal(noise, _reference_noise(6))


# ---------------------------------------------------------------------------------------------
# AlignNoise in a grain pipeline.


def test_align_noise_transform_in_grain_pipeline():
  batches = []
  for i in range(3):
    batch, _ = _packed_batch()
    batch["clean_end"] = batch["clean_end"] + np.float32(0.01 * i)
    batches.append(batch)
  dataset = grain.MapDataset.source(batches).to_iter_dataset().random_map(
      alignment.AlignNoise(), seed=0)
  first, second = list(dataset), list(dataset)
  assert len(first) == 3
  for out, again, batch in zip(first, second, batches):
    assert set(out) == set(batch) | {"noise"}
    assert out["noise"].shape == (_B, _L, _P) and out["noise"].dtype == np.float32
    for key in batch:
      np.testing.assert_array_equal(out[key], batch[key])
    np.testing.assert_array_equal(out["noise"], again["noise"])
  assert not np.array_equal(first[0]["noise"], first[1]["noise"])
  assert "noise" not in batches[0]  # the input batch is not modified
