"""Tests for pfm.data: captions, decoding, manifests, token layout and the grain pipeline."""

from __future__ import annotations

import os

import av
import numpy as np
from PIL import Image
import pytest

from configs import default
from pfm import spec as spec_lib
from pfm.data import layout
from pfm.data import manifest
from pfm.data import pipeline
from pfm.data import text
from pfm.data import video
from pfm.pyramid import resample
from pfm.pyramid import stages
from pfm.pyramid import tokens as tokens_lib


# ---------------------------------------------------------------------------------------------
# Helpers.


def _write_video(path, num_frames, size=(48, 64), faststart=False, seed=0):
  """Writes a small mpeg4 video whose frames differ (a moving gradient plus noise)."""
  rng = np.random.default_rng(seed)
  height, width = size
  options = {"movflags": "faststart"} if faststart else {}
  with av.open(str(path), "w", options=options) as container:
    stream = container.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for t in range(num_frames):
      ramp = np.linspace(0, 255, width)[None, :, None] + 20 * t
      frame = (ramp + rng.integers(0, 40, (height, width, 3))) % 256
      frame = av.VideoFrame.from_ndarray(frame.astype(np.uint8), format="rgb24")
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def _config(manifest_path="", **data):
  config = default.get_config("smoke")  # the data fields below are the ones that matter
  config.data.update(dict(manifest=manifest_path, height=32, width=32, num_frames=4, frame_stride=2,
                     max_tokens=256, max_text_tokens=256, caption_length=96, batch_size=4,
                     num_workers=0))
  config.data.update(data)
  config.model.patch_size = 4
  config.pyramid.num_stages, config.pyramid.stage_weights = 3, (1, 2, 1)
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    x, y = x.as_dict(), y.as_dict()
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
  """A folder with a good video, a too-short one, a corrupt one, a truncated one, an image."""
  folder = tmp_path_factory.mktemp("media")
  _write_video(folder / "good.mp4", 12, seed=1)
  _write_video(folder / "good2.mp4", 9, size=(40, 40), seed=2)
  _write_video(folder / "short.mp4", 3, seed=3)
  (folder / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
  _write_video(folder / "full.mp4", 20, faststart=True, seed=4)
  data = (folder / "full.mp4").read_bytes()
  (folder / "truncated.mp4").write_bytes(data[:int(len(data) * 0.9)])
  Image.fromarray(np.random.default_rng(5).integers(0, 255, (50, 30, 3), np.uint8)).save(
      folder / "still.png")
  return folder


@pytest.fixture(scope="module")
def good_manifest(media_dir):
  path = media_dir / "good.jsonl"
  manifest.write_manifest(str(path), [
      {"video": str(media_dir / "good.mp4"), "text": "a gradient slides to the right"},
      {"video": str(media_dir / "good2.mp4"), "text": "noise on a ramp"},
      {"image": str(media_dir / "still.png"), "text": "a still image of noise"},
  ], relative=True)
  return str(path)


# ---------------------------------------------------------------------------------------------
# text.py


def test_encode_caption():
  tokens = text.encode_caption("ab", 10)
  assert tokens.dtype == np.int32
  np.testing.assert_array_equal(tokens, [text.BOS_ID, ord("a") + 2, ord("b") + 2])
  np.testing.assert_array_equal(text.encode_caption("", 5), [1])
  assert len(text.encode_caption("x" * 100, 16)) == 16
  tokens = text.encode_caption("héllo", 64)  # é is two UTF-8 bytes.
  assert len(tokens) == 1 + 6 and tokens.max() < text.VOCAB_SIZE == 258
  assert text.decode_caption(tokens) == "héllo"
  with pytest.raises(ValueError):
    text.encode_caption("a", 0)


# ---------------------------------------------------------------------------------------------
# layout.py


def test_patchify_roundtrip():
  x = np.random.default_rng(0).normal(size=(2, 3, 8, 12, 3)).astype(np.float32)
  tokens = tokens_lib.patchify(x, 4)
  assert tokens.shape == (2, 3, 2 * 3, 4 * 4 * 3)
  # Token (row 1, col 2) is the patch x[..., 4:8, 8:12, :] flattened (p, p, C).
  np.testing.assert_array_equal(tokens[1, 2, 1 * 3 + 2], x[1, 2, 4:8, 8:12, :].reshape(-1))
  np.testing.assert_array_equal(tokens_lib.unpatchify(tokens, 4, 8, 12), x)
  with pytest.raises(ValueError):
    tokens_lib.patchify(x, 5)
  with pytest.raises(ValueError):
    tokens_lib.unpatchify(tokens, 4, 8, 8)


def test_history_levels():
  assert layout.history_levels(0, 1, 3) == []
  assert layout.history_levels(1, 1, 3) == [1]
  assert layout.history_levels(4, 0, 3) == [2, 2, 1, 0]
  assert layout.history_levels(3, 1, 3) == [2, 2, 1]
  assert layout.history_levels(2, 2, 3) == [2, 2]
  with pytest.raises(ValueError):
    layout.history_levels(2, 3, 3)
  assert layout.history_levels(4, 1, 3, compress=False) == [0, 0, 0, 0]  # Eq. 15, Fig. 8


def test_full_resolution_history_layout():
  """Without compression every history unit is Down(x, 1) = x, whatever the current stage."""
  p, pyramid = 4, stages.make_pyramid(3)
  frames = np.random.default_rng(1).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
  for k in range(3):
    sample = layout.layout_sample(frames, 3, k, pyramid, p, compress_history=False)
    n = layout.tokens_per_sample(3, k, height=32, width=32, patch_size=p, num_stages=3,
                                 compress_history=False)
    history = sample["is_target"] == 0
    assert len(sample["stage"]) == n and history.sum() == 3 * (32 // p) ** 2
    np.testing.assert_array_equal(sample["clean_end"][history],
                                  tokens_lib.patchify(frames[:3], p).reshape(-1, p * p * 3))
    # Full-resolution tokens sit on the current unit's (coarser) grid at their centres.
    np.testing.assert_allclose(sample["positions"][history][:2],
                               tokens_lib.grid_positions((8, 8), (8 // 2**k, 8 // 2**k))[:2])
  assert layout.max_tokens_per_sample(4, height=32, width=32, patch_size=p, num_stages=3,
                                      compress_history=False) == 4 * 64


def test_grid_positions():
  same = tokens_lib.grid_positions((2, 3), (2, 3))
  np.testing.assert_array_equal(same, [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])
  assert same.dtype == np.float32
  half = tokens_lib.grid_positions((2, 2), (4, 4))
  np.testing.assert_allclose(half, [[0.5, 0.5], [0.5, 2.5], [2.5, 0.5], [2.5, 2.5]])
  quarter = tokens_lib.grid_positions((1, 2), (4, 8))
  np.testing.assert_allclose(quarter, [[1.5, 1.5], [1.5, 5.5]])


def test_layout_sample():
  num_stages, p = 3, 4
  frames = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
  for i, k in [(3, 0), (3, 1), (2, 2), (0, 0), (1, 2)]:
    sample = layout.layout_sample(frames, i, k, stages.make_pyramid(num_stages), p)
    n = layout.tokens_per_sample(i, k, height=32, width=32, patch_size=p, num_stages=num_stages)
    assert sample["clean_end"].shape == sample["clean_start"].shape == (n, p * p * 3)
    assert sample["positions"].shape == (n, 2) and sample["positions"].dtype == np.float32
    for key in ("causal_block", "stage", "is_target"):
      assert sample[key].shape == (n,) and sample[key].dtype == np.int32
    assert np.all(sample["stage"] == k)
    target = sample["is_target"] == 1
    n_cur = (32 // 2**k // p) ** 2
    assert target.sum() == n_cur and np.all(target[-n_cur:])
    np.testing.assert_array_equal(sample["clean_end"][target],
                                  tokens_lib.patchify(resample.down(frames[i], 2**k), p))
    # The start mean Up(Down(.)); zero at the coarsest stage, whose start is pure noise.
    level = resample.down(frames[i], 2**k)  # D_k; its start mean is Up(Down(D_k)), Eq. (8)
    expected_start = (resample.up(resample.down(level, 2), 2) if k < num_stages - 1
                      else np.zeros_like(resample.down(frames[i], 2**k)))
    np.testing.assert_allclose(sample["clean_start"][target],
                               tokens_lib.patchify(expected_start, p))
    assert np.all(sample["clean_start"][~target] == 0)
    np.testing.assert_array_equal(sample["temporal_positions"], sample["causal_block"])
    assert np.all(sample["causal_block"][target] == i)
    grid = 32 // 2**k // p
    np.testing.assert_array_equal(sample["positions"][target],
                                  tokens_lib.grid_positions((grid, grid), (grid, grid)))
    # History: temporal order, each unit at its level of Eq. (16).
    causal_block = sample["causal_block"][~target]
    assert np.all(np.diff(causal_block) >= 0)
    for j, lvl in enumerate(layout.history_levels(i, k, num_stages)):
      rows = causal_block == j
      np.testing.assert_allclose(sample["clean_end"][~target][rows],
                                 tokens_lib.patchify(resample.down(frames[j], 2**lvl), p),
                                 rtol=1e-6)
      size = 32 // 2**lvl // p
      np.testing.assert_allclose(sample["positions"][~target][rows],
                                 tokens_lib.grid_positions((size, size), (grid, grid)))
  # Worst case: last unit at stage 0 = 64 current + 64 (i-1, level 0) + 16 + 4.
  assert layout.max_tokens_per_sample(4, height=32, width=32, patch_size=4, num_stages=3) == 148
  with pytest.raises(ValueError):
    layout.layout_sample(frames[:, :24, :24], 0, 0, stages.make_pyramid(num_stages), p)  # 24 % 16


# ---------------------------------------------------------------------------------------------
# video.py and manifest.py


def test_default_manifest_decodes():
  records = manifest.default_manifest()
  by_name = {os.path.basename(r["video"]): r["text"] for r in records}
  assert by_name == manifest.DEFAULT_CAPTIONS
  assert by_name["bikes.mp4"] == ("street scenes in a city: parked cars, an iron railing, and a "
                                  "man walking past bicycles")
  expected = {"bigbuckbunny.mp4": (132, 720, 1280), "bikes.mp4": (250, 272, 640),
              "carphone_pristine.mp4": (120, 144, 176)}
  for record in records:
    info = video.probe(record["video"])
    assert (info.num_frames, info.height, info.width) == expected[os.path.basename(
        record["video"])]
    frames = video.load_video(record["video"], (32, 32))
    assert frames.shape == (info.num_frames, 32, 32, 3) and frames.dtype == np.uint8
    assert frames.std() > 5  # Real content, not a blank frame.
    assert video.load_video(record["video"], (32, 32)) is frames  # Cached.


def test_read_frames(media_dir):
  all_frames = video.read_frames(str(media_dir / "good.mp4"))
  assert all_frames.shape == (12, 48, 64, 3)
  clip = video.read_frames(str(media_dir / "good.mp4"), start=2, num_frames=4, stride=3)
  np.testing.assert_array_equal(clip, all_frames[2:12:3])
  resized = video.read_frames(str(media_dir / "good.mp4"), size=(16, 16), num_frames=2)
  assert resized.shape == (2, 16, 16, 3)
  with pytest.raises(video.VideoReadError):
    video.read_frames(str(media_dir / "good.mp4"), start=8, num_frames=4, stride=2)
  still = video.read_frames(str(media_dir / "still.png"), size=(8, 16))
  assert still.shape == (1, 8, 16, 3)
  info = video.probe(str(media_dir / "still.png"))
  assert info.is_image and (info.num_frames, info.height, info.width) == (1, 50, 30)
  floats = video.to_float(still)
  assert floats.dtype == np.float32 and floats.min() >= -1 and floats.max() <= 1
  image = video.read_image(str(media_dir / "still.png"))
  assert image.shape == (50, 30, 3)
  np.testing.assert_array_equal(video.fit_frame(image, 8, 16), still[0])


def test_write_mp4(tmp_path):
  ramp = np.linspace(0, 200, 48)[None, None, :, None] + 10 * np.arange(5)[:, None, None, None]
  frames = np.broadcast_to(ramp, (5, 32, 48, 3)).astype(np.uint8)
  path = str(tmp_path / "out" / "clip.mp4")
  video.write_mp4(path, frames)
  info = video.probe(path)
  assert (info.num_frames, info.height, info.width) == (5, 32, 48)
  assert np.abs(video.read_frames(path).astype(int) - frames).mean() < 8  # Lossy codec.


def test_write_frame_grid_is_lossless(tmp_path):
  rng = np.random.default_rng(0)
  videos = [rng.integers(0, 256, (7, 8, 6, 3), np.uint8) for _ in range(2)]
  path = str(tmp_path / "out" / "grid.png")
  video.write_frame_grid(path, videos, every=3, scale=2)
  grid = video.read_image(path)
  assert grid.shape == (2 * 8 * 2, 3 * 6 * 2, 3)            # 2 rows of frames 0, 3, 6
  np.testing.assert_array_equal(grid[16:32:2, 12:24:2], videos[1][3])
  with pytest.raises(ValueError, match="one size"):
    video.write_frame_grid(path, [videos[0], videos[1][:, :4]])


def test_manifest_skips_bad_records(media_dir, tmp_path):
  path = tmp_path / "mixed.jsonl"
  # Relative paths resolve against the manifest's folder.
  rel = os.path.relpath(media_dir, tmp_path)
  lines = [f'{{"video": "{rel}/{name}", "text": "{name}"}}'
           for name in ("good.mp4", "corrupt.mp4", "short.mp4", "truncated.mp4", "missing.mp4")]
  lines.append(f'{{"image": "{rel}/still.png", "text": "still"}}')
  path.write_text("\n".join(lines) + "\n")
  records, line_report = manifest.load_manifest(str(path))
  assert records[0]["video"] == str(media_dir / "good.mp4")
  assert line_report.total == line_report.usable == 6 and not line_report.skipped
  usable, report = manifest.validate_records(records, min_frames=7, source=str(path))
  assert [os.path.basename(manifest.record_path(r)) for r in usable] == ["good.mp4", "still.png"]
  assert usable[0]["num_frames"] == 12
  assert report.counts == {"unreadable": 1, "missing": 1, "too_short": 1, "truncated": 1}
  assert report.skipped == 4 and report.usable == 2 and report.total == 6
  # The pipeline skips them too and exposes the counts.
  ds = pipeline.create_dataset(spec_lib.resolve(_config(str(path))), seed=0)
  assert pipeline.skip_counts()["unreadable"] == 1 and pipeline.skip_counts()["missing"] == 1
  assert pipeline.skip_report().usable == 2
  assert next(iter(ds)).segment_ids.max() > 0


def test_manifest_nothing_usable(media_dir, tmp_path):
  path = tmp_path / "bad.jsonl"
  manifest.write_manifest(str(path), [{"video": str(media_dir / "corrupt.mp4"), "text": "x"},
                                      {"video": str(media_dir / "short.mp4"), "text": "y"}])
  with pytest.raises(ValueError, match="bad.jsonl.*0 of 2 records usable.*too_short.*unreadable"):
    pipeline.create_dataset(spec_lib.resolve(_config(str(path))), seed=0)
  path.write_text('{"text": "no media"}\n')
  with pytest.raises(ValueError, match="bad.jsonl:1"):
    manifest.load_manifest(str(path))


def test_bidirectional_samples_are_one_attention_block(media_dir):
  """``blockwise_causal=False`` (Fig. 11): one causal block per sample, units keep their RoPE
  time."""
  kwargs = dict(height=32, width=32, num_frames=4, frame_stride=1, patch_size=4,
                pyramid=stages.make_pyramid(3), stage_weights=(1, 1, 1), caption_length=16,
                num_records=1)
  record = {"video": str(media_dir / "good.mp4"), "text": "hi"}
  causal = pipeline.MakeSample(**kwargs).random_map(record, np.random.default_rng(5))
  bidirectional = pipeline.MakeSample(**kwargs, blockwise_causal=False).random_map(
      record, np.random.default_rng(5))
  assert causal["causal_block"].max() > 0  # a sample with history
  assert np.all(bidirectional["causal_block"] == 0)
  np.testing.assert_array_equal(bidirectional["temporal_positions"], causal["causal_block"])
  np.testing.assert_array_equal(bidirectional["clean_end"], causal["clean_end"])


def test_mid_run_decode_error_is_skipped(media_dir):
  make_sample = pipeline.MakeSample(
      height=32, width=32, num_frames=4, frame_stride=2, patch_size=4,
      pyramid=stages.make_pyramid(3), stage_weights=(1, 2, 1), caption_length=16,
      num_records=2)
  rng = np.random.default_rng(0)
  before = pipeline.skip_counts().get("decode_error", 0)
  assert make_sample.random_map({"video": str(media_dir / "corrupt.mp4"), "text": ""}, rng) is None
  assert make_sample.random_map({"video": str(media_dir / "corrupt.mp4"), "text": ""}, rng) is None
  assert pipeline.skip_counts()["decode_error"] == before + 1  # Not retried.
  sample = make_sample.random_map({"video": str(media_dir / "good.mp4"), "text": "hi"}, rng)
  assert sample["text_tokens"].tolist() == [1, ord("h") + 2, ord("i") + 2]
  with pytest.raises(ValueError, match="Every one of the 2 records"):
    make_sample.random_map({"video": str(media_dir / "short.mp4"), "text": ""}, rng)


# ---------------------------------------------------------------------------------------------
# pipeline.py


def _check_batch(batch, config):
  data = config.data
  b, length, lt = data.batch_size, data.max_tokens, data.max_text_tokens
  p = config.model.patch_size
  shapes = {"clean_end": ((b, length, p * p * 3), np.float32),
            "clean_start": ((b, length, p * p * 3), np.float32),
            "segment_ids": ((b, length), np.int32), "causal_block": ((b, length), np.int32),
            "positions": ((b, length, 2), np.float32), "stage": ((b, length), np.int32),
            "is_target": ((b, length), np.int32), "text_tokens": ((b, lt), np.int32),
            "text_segment_ids": ((b, lt), np.int32),
            "temporal_positions": ((b, length), np.float32),
            "temporal_block_offset": ((b, length), np.int32)}
  assert {k: (v.shape, v.dtype) for k, v in batch.as_dict().items()} == shapes
  assert np.all(np.abs(batch.clean_end) <= 1)
  for row in range(b):
    seg, text_seg = batch.segment_ids[row], batch.text_segment_ids[row]
    ids = np.unique(seg[seg > 0])
    assert len(ids) >= 1 and np.array_equal(ids, np.arange(1, len(ids) + 1))
    assert np.array_equal(np.unique(text_seg[text_seg > 0]), ids)
    assert np.all(batch.is_target[row][seg == 0] == 0)
    assert np.all(batch.text_tokens[row][text_seg == 0] == 0)
    for s in ids:
      tokens = seg == s
      assert np.all(np.diff(np.nonzero(tokens)[0]) == 1)  # Contiguous.
      stage = batch.stage[row][tokens]
      assert np.all(stage == stage[0])
      target = batch.is_target[row][tokens] == 1
      frames = batch.causal_block[row][tokens]
      grid = data.height // 2**stage[0] // p
      assert target.sum() == grid * grid and np.all(frames[target] == frames.max())
      assert tokens.sum() == layout.tokens_per_sample(
          int(frames.max()), int(stage[0]), height=data.height, width=data.width, patch_size=p,
          num_stages=config.pyramid.num_stages)
      caption = batch.text_tokens[row][text_seg == s]
      assert caption[0] == text.BOS_ID and len(caption) <= data.caption_length


def test_pipeline_batches(good_manifest):
  config = _config(good_manifest)
  assert pipeline.check_spec(spec_lib.resolve(config)) == 148
  batches = _take(iter(pipeline.create_dataset(spec_lib.resolve(config), seed=0)), 3)
  for batch in batches:
    _check_batch(batch, config)
    assert 0 <= pipeline.padding_fraction(batch) < 1
  stages = np.concatenate([b.stage[b.is_target == 1] for b in batches])
  assert set(stages.tolist()) == {0, 1, 2}


def test_pipeline_default_manifest():
  config = _config()
  batch = next(iter(pipeline.create_dataset(spec_lib.resolve(config), seed=1)))
  _check_batch(batch, config)
  captions = {text.decode_caption(batch.text_tokens[0][batch.text_segment_ids[0] == s])
              for s in range(1, batch.segment_ids[0].max() + 1)}
  assert captions <= {c[:95] for c in manifest.DEFAULT_CAPTIONS.values()}


def test_pipeline_state_roundtrip(good_manifest):
  config = _config(good_manifest)
  iterator = iter(pipeline.create_dataset(spec_lib.resolve(config), seed=7))
  _take(iterator, 3)
  state = iterator.get_state()
  expected = _take(iterator, 3)
  restored = iter(pipeline.create_dataset(spec_lib.resolve(config), seed=7))
  restored.set_state(state)
  _assert_batches_equal(_take(restored, 3), expected)


def test_pipeline_determinism_and_sharding(good_manifest):
  config = _config(good_manifest)
  a = _take(iter(pipeline.create_dataset(spec_lib.resolve(config), seed=5)), 2)
  b = _take(iter(pipeline.create_dataset(spec_lib.resolve(config), seed=5)), 2)
  _assert_batches_equal(a, b)
  c = next(iter(pipeline.create_dataset(spec_lib.resolve(config), seed=6)))
  assert not np.array_equal(a[0].clean_end, c.clean_end)
  spec = spec_lib.resolve(config)
  shards = [pipeline.load_records(spec, shard_index=i, shard_count=2)[0] for i in range(2)]
  names = [[os.path.basename(manifest.record_path(r)) for r in s] for s in shards]
  assert names == [["good.mp4", "still.png"], ["good2.mp4"]]


def test_pipeline_workers_match_in_process(good_manifest):
  config = _config(good_manifest)
  expected = _take(iter(pipeline.create_dataset(spec_lib.resolve(config), seed=2)), 2)
  config.data.num_workers = 1
  iterator = iter(pipeline.create_dataset(spec_lib.resolve(config), seed=2))
  try:
    _assert_batches_equal(_take(iterator, 2), expected)
  finally:
    iterator.close()


def test_check_config_errors():
  with pytest.raises(ValueError, match="max_tokens"):
    pipeline.check_spec(spec_lib.resolve(_config(max_tokens=100)))
  with pytest.raises(ValueError, match="caption_length"):
    pipeline.check_spec(spec_lib.resolve(_config(caption_length=300)))
  config = _config()
  config.pyramid.stage_weights = (1, 1)
  with pytest.raises(ValueError, match="stage_weights"):
    pipeline.check_spec(spec_lib.resolve(config))


def test_patch_start_mean_matches_image_space_start_mean():
  import numpy as np
  from pfm.pyramid import resample
  x = np.random.default_rng(0).normal(size=(16, 16, 3)).astype(np.float32)
  tokens = tokens_lib.patchify(x, 4)
  np.testing.assert_allclose(tokens_lib.patch_clean_start(tokens, 4),
                             tokens_lib.patchify(resample.up(resample.down(x, 2), 2), 4), rtol=1e-6)
