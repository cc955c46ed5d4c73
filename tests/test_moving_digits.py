"""Moving Digits (``pfm/data/moving_digits.py``): splits, determinism, captions, motion, pixels,
and the ``data.dataset = "moving_digits"`` input pipeline and training run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grain
import numpy as np
import pytest
from sklearn import datasets

from configs import default
from pfm import errors
from pfm import validation
from pfm.data import moving_digits as md
from pfm.data import pipeline
from pfm.data import text as text_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def centre_of_mass(frame: np.ndarray) -> np.ndarray:
  """(y, x) intensity centroid of a uint8 [H, W, 3] frame."""
  weight = frame[..., 0].astype(np.float64)
  ys, xs = np.indices(weight.shape)
  return np.array([(ys * weight).sum(), (xs * weight).sum()]) / weight.sum()


def test_splits_partition_the_source_images():
  train, test = md.split_indices("train"), md.split_indices("test")
  assert len(np.intersect1d(train, test)) == 0
  np.testing.assert_array_equal(np.union1d(train, test), np.arange(1797))
  assert len(test) == round(0.2 * 1797)
  # Every digit class is in both splits.
  target = datasets.load_digits().target
  assert set(target[train]) == set(target[test]) == set(range(10))
  with pytest.raises(ValueError, match="split"):
    md.split_indices("val")


def test_clips_are_a_function_of_seed_split_and_index():
  a, b = md.MovingDigits(seed=3)[5], md.MovingDigits(seed=3)[5]
  np.testing.assert_array_equal(a["frames"], b["frames"])
  assert a["text"] == b["text"]
  other_seed = md.MovingDigits(seed=4)[5]["frames"]
  other_split = md.MovingDigits(split="test", seed=3)[5]["frames"]
  other_index = md.MovingDigits(seed=3)[6]["frames"]
  for other in (other_seed, other_split, other_index):
    assert not np.array_equal(a["frames"], other)


def test_clip_format_and_digit_pixels():
  ds = md.MovingDigits(num_clips=50)
  images, labels = md.digit_images("train", ds.digit_size)
  counts = set()
  for i in range(len(ds)):
    clip = ds[i]
    frames = clip["frames"]
    assert frames.shape == (16, 32, 32, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames[..., 0], frames[..., 2])
    assert frames.max() > 200  # real strokes, not a faint blur
    counts.add(len(clip["labels"]))
    if len(clip["labels"]) == 1:  # the crop at the digit's position is the upscaled digit
      y, x = clip["positions"][0, 0]
      crop = frames[0, y:y + 16, x:x + 16, 0]
      match = [j for j in range(len(images))
               if np.array_equal(crop, np.round(images[j] * 255).astype(np.uint8))]
      assert match and labels[match[0]] == clip["labels"][0]
      assert frames[0, ..., 0].sum() == crop.astype(np.int64).sum()  # nothing else drawn
  assert counts == {1, 2}


def test_captions_name_digits_and_directions():
  assert md.direction_name((1, -1)) == "down and to the left"
  assert md.direction_name((-1, 0)) == "up"
  assert md.direction_name((0, 1)) == "to the right"
  assert md.caption([7], [(1, -1)]) == "the digit 7 moves down and to the left"
  assert (md.caption([3, 5], [(-1, 0), (0, 1)])
          == "the digit 3 moves up and the digit 5 moves to the right")
  with pytest.raises(ValueError, match="direction"):
    md.direction_name((0, 0))
  ds = md.MovingDigits(num_clips=20)
  for i in range(len(ds)):
    clip = ds[i]
    assert clip["text"] == md.caption(clip["labels"], clip["directions"])


def test_motion_follows_the_caption_then_bounces():
  """Within the clip every digit moves by speed * direction per frame (no bounce); the centre of
  mass of a one-digit clip moves the named way; longer clips bounce and stay inside."""
  ds = md.MovingDigits(num_clips=40, speed=1)
  seen = set()
  for i in range(len(ds)):
    clip = ds[i]
    steps = np.diff(clip["positions"], axis=0)
    np.testing.assert_array_equal(steps, np.broadcast_to(clip["directions"], steps.shape))
    if len(clip["labels"]) == 1:
      move = centre_of_mass(clip["frames"][-1]) - centre_of_mass(clip["frames"][0])
      np.testing.assert_allclose(move, 15 * clip["directions"][0], atol=1e-6)
      seen.add(tuple(clip["directions"][0]))
  assert len(seen) >= 4
  long = md.MovingDigits(num_clips=20, num_frames=80, speed=2, caption_frames=8)
  bounced = 0
  for i in range(len(long)):
    pos = long[i]["positions"]
    assert pos.min() >= 0 and pos.max() <= 16
    steps = np.diff(pos, axis=0)
    assert np.all(np.isin(np.abs(steps), (0, 1, 2)))  # |step| < speed only at a wall
    bounced += int(np.any((steps > 0).any(axis=0) & (steps < 0).any(axis=0)))
  assert bounced == len(long)  # 80 frames at 2 px/frame in 16 px of room: every mover bounces


def test_trajectories_reflect_at_the_walls():
  pos = md.trajectories(np.array([[0, 3]]), np.array([[1, 2]]), 12, room=4)
  np.testing.assert_array_equal(pos[:, 0, 0], [0, 1, 2, 3, 4, 3, 2, 1, 0, 1, 2, 3])
  np.testing.assert_array_equal(pos[:, 0, 1], [3, 3, 1, 1, 3, 3, 1, 1, 3, 3, 1, 1])


def test_bad_settings_raise():
  with pytest.raises(ValueError, match="split"):
    md.MovingDigits(split="val")
  with pytest.raises(ValueError, match="max_digits"):
    md.MovingDigits(max_digits=3)
  with pytest.raises(ValueError, match="digit_size"):
    md.MovingDigits(size=16, digit_size=20)
  with pytest.raises(ValueError, match="speed"):
    md.MovingDigits(speed=0)
  with pytest.raises(IndexError):
    md.MovingDigits(num_clips=3)[3]


def test_is_a_grain_source():
  ds = md.MovingDigits(num_clips=8)
  loader = grain.MapDataset.source(ds).shuffle(seed=0).map(lambda c: c["frames"].mean())
  means = list(loader)
  assert len(means) == 8
  assert sorted(means) == sorted(float(ds[i]["frames"].mean()) for i in range(8))


def digits_config(**data):
  c = default.get_config("smoke")
  c.data.dataset = "moving_digits"
  c.data.moving_digits.num_clips = 16
  for key, value in data.items():
    c.data[key] = value
  return c


def test_pipeline_trains_on_moving_digits():
  spec = validation.validate(digits_config(caption_length=96, max_text_tokens=256))
  records, report = pipeline.load_records(spec)
  assert len(records) == 16 and report.usable == 16 and report.skipped == 0
  dataset = pipeline.moving_digits(spec.config)
  assert dataset.size == 32 and dataset.digit_size == 16
  assert dataset.num_frames == (spec.config.data.num_frames - 1) * spec.config.data.frame_stride + 1
  for i in (0, 7):
    np.testing.assert_array_equal(pipeline.record_frames(records[i], (32, 32)),
                                  dataset[i]["frames"])
    assert records[i]["text"] == dataset[i]["text"]
  batch = next(iter(pipeline.create_dataset(spec, seed=0)))
  captions = {r["text"] for r in records}
  rows = batch.text_tokens[batch.text_segment_ids > 0]
  assert rows.size and batch.clean_end.min() >= -1 and batch.clean_end.max() <= 1
  decoded = set()
  for row, seg in zip(batch.text_tokens, batch.text_segment_ids):
    for sid in set(seg[seg > 0].tolist()):
      decoded.add(bytes((row[seg == sid][1:] - 2).astype(np.uint8).tolist()).decode())
  assert decoded and decoded <= captions
  assert text_lib.encode_caption(records[0]["text"], 96)[0] == 1  # BOS first


@pytest.mark.parametrize("field,value,match", [
    ("dataset", "mnist", "config.data.dataset"),
    ("manifest", "/tmp/x.jsonl", "config.data.manifest"),
    ("width", 64, "config.data.height"),
])
def test_dataset_config_errors_name_the_field(field, value, match):
  with pytest.raises(errors.ConfigError, match=match):
    validation.validate(digits_config(**{field: value}))
  c = digits_config()
  c.data.moving_digits.max_digits = 3
  with pytest.raises(errors.ConfigError, match="config.data.moving_digits: max_digits"):
    validation.validate(c)


def test_train_command_on_moving_digits(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "pfm.train", "--config=configs/default.py:smoke",
       f"--workdir={tmp_path}", "--config.data.dataset=moving_digits",
       "--config.data.moving_digits.num_clips=8"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  samples = tmp_path / "samples" / "step_0000012"
  assert (samples / "metrics.json").exists() and (samples / "sample_0.mp4").exists()
  scores = json.loads((samples / "metrics.json").read_text())
  assert scores["num_prompts"] == 1 and "prompt_accuracy" in scores and "avg" in scores["swd"]
  assert (tmp_path / "digit_classifier.npz").exists()  # cached at the first sample step
  # Standalone: more prompts, the cached classifier, a progress bar, metrics.json.
  result = subprocess.run(
      [sys.executable, "-m", "pfm.evaluate", f"--workdir={tmp_path}", "--num_prompts=3"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "prompts: 100%" in result.stderr
  scores = json.loads((tmp_path / "metrics.json").read_text())
  assert scores["num_prompts"] == 3 and len(scores["per_clip"]) == 3
  assert 0.0 <= scores["identity_consistency"] <= 1.0 and scores["frechet_distance"] > 0
  result = subprocess.run(
      [sys.executable, "-m", "pfm.digit_classifier", f"--workdir={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  reading = json.loads(result.stdout.strip().splitlines()[-1])
  assert reading["size"] == 32 and reading["digit_size"] == 16
  assert reading["held_out_accuracy"] > 0.8
  result = subprocess.run([sys.executable, "-m", "pfm.digit_classifier"], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 1 and "--workdir" in result.stderr


def test_tfds_build_matches_the_source(tmp_path):
  config = md.TfdsConfig(name="tiny", num_train=5, num_test=2, num_frames=4, size=16,
                         digit_size=8)
  builder = md.MovingDigitsTfds(config=config, data_dir=str(tmp_path),
                                file_format="array_record")
  builder.download_and_prepare()
  for split, count in (("train", 5), ("test", 2)):
    source = builder.as_data_source(split=split)
    assert len(source) == count
    reference = config.split(split)
    for example in source:
      clip = reference[int(example["index"])]
      np.testing.assert_array_equal(example["frames"], clip["frames"])
      assert example["text"].decode() == clip["text"]
      np.testing.assert_array_equal(example["labels"], clip["labels"])
      np.testing.assert_array_equal(example["directions"], clip["directions"])


def test_evaluate_scores_real_videos_against_their_own_frames():
  """The default videos' own clips, scored as if generated: each lands on its own video, the
  SWD to their frames is far below that of noise, and they show no patch grid."""
  from configs import default as default_config
  from pfm import evaluate

  spec = validation.validate(default_config.get_config("smoke"))
  records = evaluate.evaluation_records(spec, 3)
  clips = [pipeline.record_frames(r, (32, 32))[::2] for r in records]
  real = evaluate.score(spec, records, clips)
  assert real["prompt_to_video_accuracy"] == 1.0 and real["assignment"] == [0, 1, 2]
  noise = [np.random.default_rng(i).integers(0, 256, c.shape, np.uint8) for i, c in
           enumerate(clips)]
  assert evaluate.score(spec, records, noise)["swd"]["avg"] > 3 * real["swd"]["avg"]
  assert set(evaluate.scalars(real)) >= {"eval/prompt_to_video_accuracy", "eval/swd_avg",
                                         "eval/seam_ratio"}
  # The real clips on the smoke config's 4x4 patch grid: no seams, like their references.
  assert 0.8 < real["seam_ratio"] < 1.25
  assert abs(real["seam_ratio"] - real["seam_ratio_real"]) < 0.1
  assert list(real["seam_ratio_by_period"]) == ["4", "8", "16"]   # patch 4, 3 spatial stages
