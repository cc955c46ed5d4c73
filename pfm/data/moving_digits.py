"""Moving Digits: Moving MNIST (Srivastava et al., 2015) built from scikit-learn's digits.

The digits are the 1797 real handwritten 8x8 digits of UCI optdigits that ship with
scikit-learn (``sklearn.datasets.load_digits``): nothing is downloaded. Each clip holds one or
two digits, each upscaled smoothly (bicubic) to ``digit_size`` pixels, moving at ``speed``
pixels per frame along one of the eight compass directions and bouncing off the canvas walls;
overlapping digits combine by their maximum, as in Moving MNIST. The caption names every digit
and the direction it starts in: "the digit 7 moves down and to the left", "the digit 3 moves up
and the digit 5 moves to the right". Start positions are drawn so that no digit bounces during
the first ``caption_frames`` frames (when the canvas allows it), so the caption holds over a
whole training clip; longer clips keep bouncing.

Splits are by source image: a fixed permutation of the 1797 images puts a fifth of them in
``"test"`` and the rest in ``"train"``, so no test clip shows a handwritten digit seen in
training. Clip ``index`` of a split is a pure function of ``(seed, split, index)``.

Pixels: uint8 ``[T, H, W, 3]`` (white digits on black, the three channels equal), like every
decoded video of ``pfm.data.video``.

``MovingDigits`` is a random-access (grain) source; ``records`` turns it into the input
pipeline's records (``data.dataset = "moving_digits"``); ``MovingDigitsTfds`` builds it as a
TFDS dataset (array_record for random access).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from PIL import Image
from sklearn import datasets
import tensorflow_datasets as tfds

SPLITS = ("train", "test")
TEST_FRACTION = 0.2
_SPLIT_SEED = 20150208  # fixes the train/test permutation of the source images once for all

# (dy, dx) per frame, in units of ``speed``; y grows downwards.
DIRECTIONS = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))
_VERTICAL = {-1: "up", 1: "down"}
_HORIZONTAL = {-1: "to the left", 1: "to the right"}


def direction_name(direction: tuple[int, int]) -> str:
  """``(dy, dx)`` -> "up", "down and to the left", "to the right", ...

  Raises:
    ValueError: for a direction that is not one of ``DIRECTIONS``.
  """
  if tuple(direction) not in DIRECTIONS:
    raise ValueError(f"direction {direction} is not one of {DIRECTIONS}")
  dy, dx = direction
  parts = [_VERTICAL[dy]] if dy else []
  if dx:
    parts.append(_HORIZONTAL[dx])
  return " and ".join(parts)


def caption(labels, directions) -> str:
  """The caption of a clip: each digit with the direction it starts in."""
  return " and ".join(f"the digit {int(label)} moves {direction_name(d)}"
                      for label, d in zip(labels, directions))


@functools.cache
def _source_digits() -> tuple[np.ndarray, np.ndarray]:
  digits = datasets.load_digits()
  images = (digits.images / 16.0).astype(np.float32)  # optdigits counts 0..16 -> [0, 1]
  return images, digits.target.astype(np.int32)


def split_indices(split: str) -> np.ndarray:
  """Indices into ``load_digits()`` of the source images of ``split`` (sorted).

  Raises:
    ValueError: for a split other than ``"train"`` or ``"test"``.
  """
  if split not in SPLITS:
    raise ValueError(f"split {split!r} is not one of {SPLITS}")
  images, _ = _source_digits()
  order = np.random.default_rng(_SPLIT_SEED).permutation(len(images))
  num_test = int(round(TEST_FRACTION * len(images)))
  return np.sort(order[:num_test] if split == "test" else order[num_test:])


@functools.lru_cache(maxsize=8)
def digit_images(split: str, digit_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The split's digits upscaled to ``digit_size`` pixels.

  Returns:
    ``(images, labels)``: float32 ``[N, digit_size, digit_size]`` in [0, 1] and int32 ``[N]``.
  """
  images, labels = _source_digits()
  index = split_indices(split)
  big = np.stack([
      np.asarray(Image.fromarray(images[i]).resize((digit_size, digit_size),
                                                   Image.Resampling.BICUBIC))
      for i in index])
  big = np.clip(big, 0.0, 1.0)
  big.setflags(write=False)
  return big, labels[index]


@dataclasses.dataclass(frozen=True)
class MovingDigits:
  """A split of the Moving Digits dataset: a random-access source of captioned clips.

  Usable directly as a grain ``RandomAccessDataSource`` (``len`` and ``[index]``).

  Attributes:
    split: ``"train"`` or ``"test"``.
    num_clips: clips in the split.
    num_frames: frames per clip.
    size: canvas height and width in pixels.
    digit_size: side of an upscaled digit in pixels (<= size).
    max_digits: each clip holds 1..max_digits digits (1 or 2), equally likely.
    speed: pixels per frame along each moving axis (>= 1).
    caption_frames: frames without a bounce at the start of every clip (if the canvas allows);
      None = ``num_frames``.
    seed: the dataset's seed.
  """

  split: str = "train"
  num_clips: int = 1000
  num_frames: int = 16
  size: int = 32
  digit_size: int = 16
  max_digits: int = 2
  speed: int = 1
  caption_frames: int | None = None
  seed: int = 0

  def __post_init__(self):
    if self.split not in SPLITS:
      raise ValueError(f"split {self.split!r} is not one of {SPLITS}")
    if not 1 <= self.max_digits <= 2:
      raise ValueError(f"max_digits must be 1 or 2, got {self.max_digits}")
    for name in ("num_clips", "num_frames", "digit_size", "speed"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.digit_size > self.size:
      raise ValueError(f"digit_size={self.digit_size} does not fit the {self.size}-pixel canvas")

  def __len__(self) -> int:
    return self.num_clips

  def __getitem__(self, index: int) -> dict:
    """Clip ``index``: ``{"frames": uint8 [T, H, W, 3], "text": str, "labels": int32 [n],
    "directions": int32 [n, 2], "positions": int32 [T, n, 2]}`` (top-left corners, y then x).

    Raises:
      IndexError: for an index outside ``[0, len)``.
    """
    index = int(index)
    if not 0 <= index < self.num_clips:
      raise IndexError(f"clip {index} of a {self.num_clips}-clip split")
    images, labels = digit_images(self.split, self.digit_size)
    rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
    count = int(rng.integers(1, self.max_digits + 1))
    which = rng.integers(0, len(images), count)
    directions = np.asarray(DIRECTIONS, np.int32)[rng.integers(0, len(DIRECTIONS), count)]
    starts = np.stack([self._start(rng, d) for d in directions])
    positions = trajectories(starts, directions * self.speed, self.num_frames,
                             self.size - self.digit_size)
    return {"frames": render(images[which], positions, self.size),
            "text": caption(labels[which], directions),
            "labels": labels[which], "directions": directions, "positions": positions}

  def _start(self, rng: np.random.Generator, direction: np.ndarray) -> np.ndarray:
    """A top-left corner from which ``direction`` runs ``caption_frames`` frames unbounced."""
    room = self.size - self.digit_size
    travel = self.speed * ((self.caption_frames or self.num_frames) - 1)
    start = []
    for d in direction:
      if d == 0 or travel > room:  # no constraint, or the canvas is too small to avoid a bounce
        start.append(rng.integers(0, room + 1))
      else:
        low = int(rng.integers(0, room - travel + 1))
        start.append(low if d > 0 else room - low)
    return np.asarray(start, np.int32)


def trajectories(starts: np.ndarray, velocities: np.ndarray, num_frames: int,
                 room: int) -> np.ndarray:
  """Positions bouncing inside ``[0, room]`` on each axis (reflection at the walls).

  Args:
    starts: int ``[n, 2]`` positions at frame 0, in ``[0, room]``.
    velocities: int ``[n, 2]`` pixels per frame.
    num_frames: T.
    room: the largest position (canvas size minus digit size).

  Returns:
    int32 ``[T, n, 2]``.
  """
  t = np.arange(num_frames)[:, None, None]
  raw = starts[None] + velocities[None] * t
  if room == 0:
    return np.zeros_like(raw, np.int32)
  period = 2 * room
  folded = np.mod(raw, period)
  return np.where(folded > room, period - folded, folded).astype(np.int32)


def render(images: np.ndarray, positions: np.ndarray, size: int) -> np.ndarray:
  """Digits pasted at their positions, combined by their maximum.

  Args:
    images: float ``[n, d, d]`` in [0, 1].
    positions: int ``[T, n, 2]`` top-left corners inside the canvas.
    size: canvas side.

  Returns:
    uint8 ``[T, size, size, 3]``.
  """
  num_frames, count, _ = positions.shape
  d = images.shape[-1]
  canvas = np.zeros((num_frames, size, size), np.float32)
  for f in range(num_frames):
    for j in range(count):
      y, x = positions[f, j]
      np.maximum(canvas[f, y:y + d, x:x + d], images[j], out=canvas[f, y:y + d, x:x + d])
  pixels = np.round(canvas * 255.0).astype(np.uint8)
  return np.repeat(pixels[..., None], 3, axis=-1)


def records(dataset: MovingDigits) -> list[dict]:
  """The split as pipeline records: ``{"moving_digits": settings, "index": i, "text": caption}``.

  A record carries the dataset's settings, so any consumer (the input pipeline, training-time
  samples, the evaluator) renders its clip with ``record_frames`` alone.
  """
  settings = dataclasses.asdict(dataset)
  return [{"moving_digits": settings, "index": i, "text": dataset[i]["text"]}
          for i in range(len(dataset))]


def is_record(record: dict) -> bool:
  """True for a record made by ``records``."""
  return "moving_digits" in record


def record_name(record: dict) -> str:
  """``"moving_digits/train/17"``: the record's name in logs and skip reports."""
  return f"moving_digits/{record['moving_digits']['split']}/{record['index']}"


@functools.lru_cache(maxsize=4)
def _dataset(settings: tuple) -> MovingDigits:
  return MovingDigits(**dict(settings))


def record_frames(record: dict) -> np.ndarray:
  """The clip of a record made by ``records``: uint8 ``[T, H, W, 3]``."""
  return _dataset(tuple(sorted(record["moving_digits"].items())))[record["index"]]["frames"]


@dataclasses.dataclass(eq=False)
class TfdsConfig(tfds.core.BuilderConfig):
  """Settings of a Moving Digits TFDS build (``MovingDigits`` fields; clips per split)."""

  num_train: int = 10_000
  num_test: int = 1_000
  num_frames: int = 16
  size: int = 32
  digit_size: int = 16
  max_digits: int = 2
  speed: int = 1
  seed: int = 0

  def split(self, split: str) -> MovingDigits:
    return MovingDigits(split=split, num_clips=self.num_train if split == "train" else
                        self.num_test, num_frames=self.num_frames, size=self.size,
                        digit_size=self.digit_size, max_digits=self.max_digits,
                        speed=self.speed, seed=self.seed)


class MovingDigitsTfds(tfds.core.GeneratorBasedBuilder):
  """Moving Digits as a TFDS dataset, ``"train"`` and ``"test"`` splits, any file format.

  ``file_format="array_record"`` gives random access (``builder.as_data_source(split)``, a grain
  source). Each example: ``frames`` uint8 ``[T, H, W, 3]``, ``text`` (bytes), ``labels`` int32
  ``[n]``, ``directions`` int32 ``[n, 2]`` and ``index`` (the clip's index in its split:
  ``MovingDigits(...)[index]`` renders the same clip).

      builder = MovingDigitsTfds(config="32px", data_dir=..., file_format="array_record")
      builder.download_and_prepare()
  """

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [
      TfdsConfig(name="32px", description="32x32 pixels, 16 frames, 16-pixel digits"),
      TfdsConfig(name="64px", size=64, digit_size=32,
                 description="64x64 pixels, 16 frames, 32-pixel digits"),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict({
            "frames": tfds.features.Tensor(shape=(c.num_frames, c.size, c.size, 3),
                                           dtype=np.uint8),
            "text": tfds.features.Text(),
            "labels": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "directions": tfds.features.Tensor(shape=(None, 2), dtype=np.int32),
            "index": tfds.features.Scalar(dtype=np.int64),
        }),
        homepage="https://archive.ics.uci.edu/dataset/80",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the digits ship with scikit-learn
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    dataset = self.builder_config.split(split)
    for i in range(len(dataset)):
      clip = dataset[i]
      yield i, {"frames": clip["frames"], "text": clip["text"], "labels": clip["labels"],
                "directions": clip["directions"], "index": i}
