"""Moving Digits metrics (``pfm/metrics/digits.py``) rank real clips above corrupted ones."""

from __future__ import annotations

import numpy as np
import pytest

from pfm.metrics import digits as dm
from pfm.data import moving_digits as md


@pytest.fixture(scope="module")
def classifier():
  return dm.train_classifier()  # ClassifierSettings(): 16-pixel digits, 32-pixel frames


@pytest.fixture(scope="module")
def clips():
  ds = md.MovingDigits(split="test", num_clips=40, max_digits=1)
  return [ds[i] for i in range(len(ds))]


def evaluate(classifier, clips, corrupt=lambda c: c["frames"], caption=lambda c: c):
  per_clip, features = [], []
  for clip in clips:
    frames, named = corrupt(clip), caption(clip)
    per_clip.append(dm.clip_metrics(classifier, frames, named["labels"], named["directions"], 16))
    features.append(dm.clip_features(classifier, frames, 1, 16))
  return dm.summarize(per_clip), np.concatenate(features)


def test_real_held_out_clips_score_high(classifier, clips):
  metrics, _ = evaluate(classifier, clips)
  assert metrics["prompt_accuracy"] >= 0.9  # held-out handwriting
  assert metrics["identity_consistency"] >= 0.95
  assert metrics["direction_accuracy"] == 1.0
  assert metrics["motion_smoothness"] < 1e-6  # constant velocity within a clip


def test_each_metric_ranks_the_corruption_it_measures(classifier, clips):
  real, real_features = evaluate(classifier, clips)
  rng = np.random.default_rng(0)
  # Wrong digits named: prompt accuracy falls to about chance.
  relabelled, _ = evaluate(classifier, clips, caption=lambda c: dict(
      c, labels=(np.asarray(c["labels"]) + 1 + rng.integers(0, 9)) % 10))
  assert relabelled["prompt_accuracy"] < real["prompt_accuracy"] - 0.5
  # Frames in random order: the named direction and smooth motion are lost.
  shuffled, _ = evaluate(classifier, clips, corrupt=lambda c: c["frames"][rng.permutation(16)])
  assert shuffled["direction_accuracy"] < real["direction_accuracy"] - 0.2
  assert shuffled["motion_smoothness"] > real["motion_smoothness"] + 1.0
  # Heavy pixel noise: digits are misread and the features move away from real clips.
  noisy, noisy_features = evaluate(classifier, clips, corrupt=lambda c: np.clip(
      c["frames"].astype(int) + rng.integers(-90, 91, c["frames"].shape), 0, 255).astype(np.uint8))
  assert noisy["identity_consistency"] < real["identity_consistency"]
  train = md.MovingDigits(split="train", num_clips=40, max_digits=1)
  train_features = np.concatenate([dm.clip_features(classifier, train[i]["frames"], 1, 16)
                                   for i in range(len(train))])
  assert (dm.frechet_distance(real_features, train_features)
          < 0.5 * dm.frechet_distance(noisy_features, train_features))


def test_frechet_distance_of_gaussians():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((20_000, 3))
  b = rng.standard_normal((20_000, 3)) * 2.0 + 1.0
  # ||mu||^2 + Tr(I + 4I - 2 * 2I) = 3 + 3 = 6.
  assert dm.frechet_distance(a, b) == pytest.approx(6.0, rel=0.05)
  assert dm.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_two_digit_clips_read_when_they_stand_apart(classifier):
  """Digits a quarter of the frame side stand apart in most frames: read at about 89%."""
  reader = dm.train_classifier(dm.ClassifierSettings(digit_size=16, size=64))
  ds = md.MovingDigits(split="test", num_clips=60, size=64, digit_size=16, max_digits=2)
  clips = [c for c in (ds[i] for i in range(len(ds))) if len(c["labels"]) == 2]
  result = dm.score_clips(reader, [c["frames"] for c in clips], clips,
                          [c["frames"] for c in clips], 16)
  assert result["prompt_accuracy"] >= 0.75 and np.isnan(result["direction_accuracy"])
  # Touching digits are split along their centres: two crops from one merged blob.
  frame = md.render(md.digit_images("test", 16)[0][:2], np.array([[[8, 8], [8, 14]]]), 32)[0]
  assert dm.read_frame(frame, 2, 16).digits8.shape == (2, 64)


def test_classifier_saves_loads_and_is_reused(classifier, tmp_path):
  path = str(tmp_path / "reader.npz")
  classifier.save(path)
  loaded = dm.DigitClassifier.load(path)
  assert loaded.settings == classifier.settings
  crops = np.random.default_rng(0).uniform(0, 16, (20, 64))
  np.testing.assert_array_equal(loaded.predict(crops), classifier.predict(crops))
  np.testing.assert_allclose(loaded.features(crops), classifier.features(crops))
  assert dm.load_or_train(path, classifier.settings).settings == classifier.settings
  other = dm.ClassifierSettings(digit_size=8, size=16, num_examples=500)
  assert dm.load_or_train(path, other).settings == other  # retrained for other settings
  assert dm.DigitClassifier.load(path).settings == other
  np.savez(str(tmp_path / "bad.npz"), x=np.zeros(2))
  with pytest.raises(ValueError, match="not a saved digit classifier"):
    dm.DigitClassifier.load(str(tmp_path / "bad.npz"))


def test_score_clips_of_real_and_corrupted_sets(classifier, clips):
  references = [md.MovingDigits(split="test", num_clips=40, max_digits=1, seed=9)[i]["frames"]
                for i in range(40)]
  real = dm.score_clips(classifier, [c["frames"] for c in clips], clips, references, 16)
  blank = dm.score_clips(classifier, [np.zeros_like(c["frames"]) for c in clips], clips,
                         references, 16)
  assert real["prompt_accuracy"] >= 0.9 and blank["prompt_accuracy"] == 0.0
  assert np.isnan(blank["frechet_distance"]) and len(real["per_clip"]) == len(clips)
  with pytest.raises(ValueError, match=">= 2 feature rows"):
    dm.frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))


def test_empty_frame_reads_no_digit():
  reading = dm.read_frame(np.zeros((32, 32, 3), np.uint8), 2, 16)
  assert reading.digits8.shape == (0, 64) and reading.centres.shape == (0, 2)
