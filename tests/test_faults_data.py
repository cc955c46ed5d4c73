"""Tests for bad input data: malformed manifest lines, damaged media files, over-long captions."""

from __future__ import annotations

import json
import pickle
import struct

import av
import numpy as np
from PIL import Image
import pytest

from configs import default
from pfm import spec as spec_lib
from pfm.data import manifest
from pfm.data import pipeline
from pfm.data import text
from pfm.data import video
from pfm.pyramid import stages


# ---------------------------------------------------------------------------------------------
# Helpers.


def _frames(num_frames=6, size=(32, 32), seed=0):
  return np.random.default_rng(seed).integers(0, 255, (num_frames, *size, 3), np.uint8)


def _write_faststart_mp4(path, num_frames=12, size=(32, 32)):
  """An mpeg4 mp4 with its 'moov' box before 'mdat' (the index first, then the frames)."""
  with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
    stream = container.add_stream("mpeg4", rate=10)
    stream.height, stream.width = size
    stream.pix_fmt = "yuv420p"
    for frame in _frames(num_frames, size):
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def _top_level_boxes(data):
  boxes, offset = [], 0
  while offset < len(data):
    size, kind = struct.unpack(">I4s", data[offset:offset + 8])
    boxes.append((kind, offset, size))
    offset += size
  return boxes


def _box(kind, payload=b""):
  return struct.pack(">I4s", 8 + len(payload), kind) + payload


def _reason(path):
  with pytest.raises(video.VideoReadError) as info:
    video.probe(str(path))
  return info.value.reason


def _config(manifest_path, **data):
  config = default.get_config("smoke")  # the data fields below are the ones that matter
  config.data.update(dict(manifest=manifest_path, height=32, width=32, num_frames=2, frame_stride=1,
                     max_tokens=256, max_text_tokens=64, caption_length=16, batch_size=2,
                     num_workers=0))
  config.data.update(data)
  config.model.patch_size = 4
  config.pyramid.num_stages, config.pyramid.stage_weights = 3, (1, 2, 1)
  return config


@pytest.fixture(scope="module")
def good_mp4(tmp_path_factory):
  path = tmp_path_factory.mktemp("media") / "good.mp4"
  video.write_mp4(str(path), _frames())
  return path


@pytest.fixture(scope="module")
def half_mp4(good_mp4):
  path = good_mp4.parent / "half.mp4"
  data = good_mp4.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  return path


# ---------------------------------------------------------------------------------------------
# Manifest lines.


def test_load_manifest_skips_malformed_lines(tmp_path, good_mp4):
  path = tmp_path / "m.jsonl"
  video_path = str(good_mp4)
  lines = [
      json.dumps({"video": video_path, "text": "good"}),  # 1
      '{"video": "a.mp4", "text": "unterminated',  # 2: not JSON
      "",  # 3: blank, ignored
      "# a comment",  # 4: ignored
      json.dumps(["video", video_path]),  # 5: not an object
      json.dumps("video"),  # 6: not an object
      json.dumps({"video": video_path, "image": video_path, "text": "x"}),  # 7: two media
      json.dumps({"video": 3, "text": "x"}),  # 8: not a string
      json.dumps({"image": "", "text": "x"}),  # 9: empty path
      json.dumps({"text": "no media"}),  # 10
      json.dumps({"video": video_path, "text": 7}),  # 11: text not a string
      json.dumps({"video": video_path, "text": None}),  # 12
      json.dumps({"video": video_path}),  # 13: no caption
      json.dumps({"image": "still.png", "text": ""}),  # 14: unconditional, kept
  ]
  data = "\n".join(lines).encode() + b'\n{"video": "\xff\xfe.mp4", "text": "x"}\n'  # 15: bad UTF-8
  path.write_bytes(data)
  records, report = manifest.load_manifest(str(path))
  assert records == [{"video": video_path, "text": "good"},
                     {"image": str(tmp_path / "still.png"), "text": ""}]
  assert report.counts == {"malformed_line": 10, "no_caption": 1}
  assert report.total == 13 and report.usable == 2 and report.skipped == 11
  assert report.source == str(path)
  where = [w for w, _ in report.examples]
  assert where[:3] == [f"{path}:2", f"{path}:5", f"{path}:6"]
  summary = report.summary()
  assert f"{path}: 2 of 13 records usable; skipped: 10 malformed_line, 1 no_caption" in summary
  assert f"  {path}:2: not valid JSON" in summary
  # Lines past the first ``max_examples`` skips are counted but not listed.
  assert len(report.examples) == manifest.SkipReport.max_examples


def test_load_manifest_byte_order_mark(tmp_path):
  path = tmp_path / "bom.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"video": "a.mp4", "text": "a"}).encode() + b"\n")
  records, report = manifest.load_manifest(str(path))
  assert records == [{"video": str(tmp_path / "a.mp4"), "text": "a"}] and not report.skipped


def test_load_manifest_nothing_usable(tmp_path):
  path = tmp_path / "none.jsonl"
  path.write_text('not json\n{"video": "a.mp4"}\n\n# only comments and bad lines\n')
  with pytest.raises(ValueError, match=r"none\.jsonl: 0 of 2 records usable; skipped: "
                     r"1 malformed_line, 1 no_caption(.|\n)*none\.jsonl:1: not valid JSON"):
    manifest.load_manifest(str(path))


def test_load_records_one_report(tmp_path, good_mp4, half_mp4):
  path = tmp_path / "mixed.jsonl"
  lines = [json.dumps({"video": str(good_mp4), "text": "good"}),
           "{broken",
           json.dumps({"video": str(good_mp4)}),
           json.dumps({"video": str(tmp_path / "gone.mp4"), "text": "gone"}),
           json.dumps({"video": str(half_mp4), "text": "half"})]
  path.write_text("\n".join(lines) + "\n")
  records, report = pipeline.load_records(spec_lib.resolve(_config(str(path))))
  assert [r["video"] for r in records] == [str(good_mp4)]
  assert report.counts == {"malformed_line": 1, "no_caption": 1, "missing": 1, "truncated": 1}
  assert report.total == 5 and report.usable == 1
  assert [w for w, _ in report.examples] == [f"{path}:2", f"{path}:3", str(tmp_path / "gone.mp4"),
                                             str(half_mp4)]
  # The training loop logs these counts as ``data/skipped_<reason>``.
  pipeline.create_dataset(spec_lib.resolve(_config(str(path))), seed=0)
  counts = pipeline.skip_counts()
  assert all(counts[k] == v for k, v in report.counts.items())


def test_load_records_sharded_nothing_usable(tmp_path, half_mp4):
  path = tmp_path / "bad.jsonl"
  lines = ["[1, 2]", json.dumps({"video": str(half_mp4), "text": "a"}),
           json.dumps({"video": str(tmp_path / "gone.mp4"), "text": "b"})]
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"bad\.jsonl \(shard 1 of 2\): 0 of 2 records usable; "
                     r"skipped: 1 malformed_line, 1 missing"):
    pipeline.load_records(spec_lib.resolve(_config(str(path))), shard_index=1, shard_count=2)


def test_validate_records_adds_to_report():
  report = manifest.SkipReport(source="earlier")
  report.total = 1
  report.add("malformed_line", "earlier:1", "not valid JSON")
  with pytest.raises(ValueError, match="earlier: 0 of 2 records usable; skipped: 1 malformed_line,"
                     " 1 missing"):
    manifest.validate_records([{"video": "/nonexistent/a.mp4", "text": ""}], min_frames=1,
                              report=report)


# ---------------------------------------------------------------------------------------------
# Damaged media: the reason comes from the file's structure.


def test_truncated_mp4_is_truncated(good_mp4, half_mp4, tmp_path):
  data = good_mp4.read_bytes()
  assert data[4:8] == b"ftyp" and b"moov" in [kind for kind, _, _ in _top_level_boxes(data)]
  assert video.truncation(str(good_mp4)) is None
  assert _reason(half_mp4) == "truncated"  # FFmpeg: "Invalid data found when processing input".
  assert "ends inside its 'mdat' box" in video.truncation(str(half_mp4))
  # Index first (faststart), cut inside the frames: the container declares more frames than
  # it holds, or the 'mdat' box runs past the end.
  full = tmp_path / "full.mp4"
  _write_faststart_mp4(full)
  data = full.read_bytes()
  boxes = {kind: (offset, size) for kind, offset, size in _top_level_boxes(data)}
  assert boxes[b"moov"][0] < boxes[b"mdat"][0]
  for fraction in (0.3, 0.6, 0.9):
    cut = tmp_path / f"cut{fraction}.mp4"
    cut.write_bytes(data[:int(len(data) * fraction)])
    assert _reason(cut) == "truncated"
  with pytest.raises(video.VideoReadError) as info:
    video.read_frames(str(half_mp4))
  assert info.value.reason == "truncated"


def test_iso_bmff_box_walk(tmp_path):
  ftyp = _box(b"ftyp", b"isom\x00\x00\x02\x00isom")
  moov = _box(b"moov", b"\x00" * 16)
  cases = {
      "complete": (ftyp + moov + _box(b"mdat", b"x" * 10), None),
      "only_ftyp": (ftyp, "has no 'moov' box"),
      "moov_cut": ((ftyp + moov)[:-4], "ends inside its 'moov' box"),
      "header_cut": (ftyp + moov + b"\x00\x00", "ends inside a box header"),
      "to_end": (ftyp + moov + struct.pack(">I4s", 0, b"mdat") + b"x" * 50, None),
      "to_end_no_moov": (ftyp + struct.pack(">I4s", 0, b"mdat") + b"x" * 50, "has no 'moov'"),
      "large": (ftyp + moov + struct.pack(">I4sQ", 1, b"mdat", 16 + 20) + b"x" * 20, None),
      "large_cut": (ftyp + moov + struct.pack(">I4sQ", 1, b"mdat", 16 + 2**33) + b"x" * 20,
                    "ends inside its 'mdat' box"),
      "large_header_cut": (ftyp + moov + struct.pack(">I4s", 1, b"mdat") + b"\x00" * 3,
                           "ends inside the header of its 'mdat' box"),
      "bad_size": (ftyp + struct.pack(">I4s", 4, b"moov") + b"x" * 20, None),  # Malformed.
  }
  for name, (data, expected) in cases.items():
    path = tmp_path / f"{name}.mp4"
    path.write_bytes(data)
    found = video.truncation(str(path))
    if expected is None:
      assert found is None, name
    else:
      assert found is not None and expected in found, (name, found)
    assert video.is_truncated(str(path)) == (expected is not None)
  assert _reason(tmp_path / "only_ftyp.mp4") == "truncated"
  assert _reason(tmp_path / "bad_size.mp4") == "unreadable"


def test_corrupt_png_is_unreadable(tmp_path):
  ramp = np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None]
  Image.fromarray(np.ascontiguousarray(np.broadcast_to(ramp, (64, 64, 3)))).save(tmp_path / "a.png")
  data = bytearray((tmp_path / "a.png").read_bytes())
  idat = data.index(b"IDAT") + 4  # The chunk's data: a zlib stream.
  # A stored deflate block declaring 65535 bytes: Pillow runs out of IDAT data and says "image
  # file is truncated", though the file is whole and ends with IEND.
  data[idat + 2:idat + 7] = b"\x00\xff\xff\x00\x00"
  corrupt = tmp_path / "corrupt.png"
  corrupt.write_bytes(bytes(data))
  assert len(data) == (tmp_path / "a.png").stat().st_size and data.endswith(b"IEND\xaeB`\x82")
  records = [{"image": str(tmp_path / "a.png"), "text": ""}, {"image": str(corrupt), "text": ""}]
  _, report = manifest.validate_records(records, min_frames=1, num_threads=1)
  assert report.counts == {"unreadable": 1}
  assert _reason(corrupt) == "unreadable"
  assert video.truncation(str(corrupt)) is None
  # The same with zeros written over the middle of the IDAT data.
  data = bytearray((tmp_path / "a.png").read_bytes())
  data[idat + 20:idat + 60] = bytes(40)
  (tmp_path / "zeros.png").write_bytes(bytes(data))
  assert _reason(tmp_path / "zeros.png") == "unreadable"


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".gif"])
def test_truncated_image_is_truncated(tmp_path, suffix):
  Image.fromarray(_frames(1, (40, 40))[0]).save(tmp_path / f"a{suffix}")
  data = (tmp_path / f"a{suffix}").read_bytes()
  assert video.truncation(str(tmp_path / f"a{suffix}")) is None
  cut = tmp_path / f"cut{suffix}"
  cut.write_bytes(data[:len(data) // 2])
  assert video.is_truncated(str(cut))
  assert _reason(cut) == "truncated"
  with pytest.raises(video.VideoReadError) as info:
    video.read_image(str(cut))
  assert info.value.reason == "truncated"


def test_missing_and_unreadable(tmp_path):
  assert _reason(tmp_path / "gone.mp4") == "missing"
  assert _reason(tmp_path / "gone.png") == "missing"
  with pytest.raises(video.VideoReadError) as info:
    video.read_image(str(tmp_path / "gone.png"))
  assert info.value.reason == "missing"
  (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
  (tmp_path / "noise.png").write_bytes(np.random.default_rng(1).bytes(4000))
  (tmp_path / "empty.mp4").write_bytes(b"")
  for name in ("noise.mp4", "noise.png", "empty.mp4"):
    assert _reason(tmp_path / name) == "unreadable", name


def test_validate_records_uses_error_reason(tmp_path, good_mp4, half_mp4):
  (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
  records = [{"video": str(p), "text": ""}
             for p in (good_mp4, half_mp4, tmp_path / "noise.mp4", tmp_path / "gone.mp4")]
  usable, report = manifest.validate_records(records, min_frames=2, num_threads=2)
  assert len(usable) == 1
  assert report.counts == {"truncated": 1, "unreadable": 1, "missing": 1}
  assert not hasattr(manifest, "_classify")


def test_video_read_error_reason():
  error = video.VideoReadError("a.mp4: cut", "truncated")
  assert error.reason == "truncated" and str(error) == "a.mp4: cut"
  copy = pickle.loads(pickle.dumps(error))
  assert copy.reason == "truncated" and str(copy) == "a.mp4: cut"
  assert video.VideoReadError("x").reason == "unreadable"
  with pytest.raises(ValueError):
    video.VideoReadError("x", "truncated by me")
  assert set(video.REASONS) <= set(manifest.SKIP_REASONS)


# ---------------------------------------------------------------------------------------------
# Captions.


@pytest.mark.parametrize("caption", ["é" * 100, "😀" * 40, "a日é😀" * 20],
                         ids=["two_bytes", "four_bytes", "mixed"])
def test_encode_caption_cuts_at_character_boundary(caption):
  for max_len in range(1, 40):
    tokens = text.encode_caption(caption, max_len)
    decoded = text.decode_caption(tokens)
    assert "\ufffd" not in decoded, max_len
    assert caption.startswith(decoded), max_len
    assert len(tokens) <= max_len and len(tokens) >= max_len - 3
    assert len(decoded.encode("utf-8")) == len(tokens) - 1
  assert not any(text.caption_fits(caption, max_len) for max_len in range(1, 40))
  tokens = text.encode_caption("é" * 100, 16)  # 15 bytes fit, i.e. 7 whole characters.
  assert text.decode_caption(tokens) == "é" * 7 and len(tokens) == 15


def test_caption_fits():
  assert text.caption_fits("", 1) and not text.caption_fits("a", 1)
  assert text.caption_fits("ab", 3) and not text.caption_fits("abc", 3)
  assert text.caption_fits("é", 3) and not text.caption_fits("é", 2)  # Two UTF-8 bytes.
  assert len(text.encode_caption("abc", 4)) == 4


def test_load_records_warns_once_on_long_captions(tmp_path, good_mp4, monkeypatch):
  path = tmp_path / "long.jsonl"
  captions = ["short", "é" * 10, "x" * 15, "y" * 16, "😀" * 4]  # Budget 15 bytes: 3 too long.
  path.write_text("\n".join(json.dumps({"video": str(good_mp4), "text": c}, ensure_ascii=False)
                            for c in captions) + "\n", encoding="utf-8")
  warnings = []
  monkeypatch.setattr(pipeline.logging, "warning", lambda msg, *args: warnings.append(msg % args))
  records, _ = pipeline.load_records(spec_lib.resolve(_config(str(path), caption_length=16)))
  assert [r["text"] for r in records] == captions  # They still train, cut when encoded.
  caption_warnings = [w for w in warnings if "caption" in w]
  assert len(caption_warnings) == 1
  assert "3 of 5 captions" in caption_warnings[0] and "15 UTF-8 bytes" in caption_warnings[0]
  # The samples carry the cut captions, whole characters only.
  make_sample = pipeline.MakeSample(
      height=32, width=32, num_frames=2, frame_stride=1, patch_size=4,
      pyramid=stages.make_pyramid(3), stage_weights=(1, 2, 1), caption_length=16,
      num_records=len(records))
  sample = make_sample.random_map(records[1], np.random.default_rng(0))
  assert text.decode_caption(sample["text_tokens"]) == "é" * 7
  warnings.clear()
  path.write_text(json.dumps({"video": str(good_mp4), "text": "fits"}) + "\n")
  pipeline.load_records(spec_lib.resolve(_config(str(path), caption_length=16)))
  assert not [w for w in warnings if "caption" in w]
