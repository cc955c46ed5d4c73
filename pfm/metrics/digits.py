"""Download-free metrics for Moving Digits clips: which digits, how they move, how real they look.

A small classifier trained on the training split's source digits (``train_classifier``: an MLP
with one hidden layer of 128 ReLU units, fitted by scikit-learn on the 8x8 crops that
``read_frame`` makes of rendered training digits; seconds on a CPU) reads the digits of a clip.
Each frame is segmented into bright blobs (``scipy.ndimage.label`` after a dilation that joins a
digit's strokes); each of the largest ``num_digits`` blobs is cropped around its centre of mass
at the digit size, reduced to 8x8 and classified. From this, per clip against its caption:

* ``prompt_accuracy``: the clip's digits are the named ones. The clip's reading is the most
  frequent per-frame reading among the frames where all named digits stand apart (as many blobs
  as digits; all frames when there are none), so two digits that touch in some frames are read
  where they do not. Real held-out clips read about 97% (one digit) and 85% (two).
* ``identity_consistency``: the fraction of frames read as the clip's digits (with all digits
  apart, or all frames when there are none).
* ``direction_accuracy``: for one-digit clips, the sign of the centre-of-mass displacement from
  the first to the last frame matches the named direction on both axes (moves under 1 pixel
  count as 0).
* ``motion_smoothness``: for one-digit clips, the mean magnitude of the second difference of
  that centre of mass, in pixels per frame^2 (0 for constant velocity; lower is better).
* ``frechet_distance``: the Fréchet distance between Gaussians fitted to the classifier's hidden
  features of every digit crop of two sets of clips (an FVD-like score in the spirit of
  Heusel et al., 2017; lower is better). Its value depends on the number of crops, so compare
  scores computed from the same numbers of clips.

The classifier is saved as plain arrays (``DigitClassifier.save``, an ``.npz`` file with its
settings), so a cached classifier loads without pickles and without scikit-learn's version:
``python -m pfm.digit_classifier --output=PATH`` trains one, and ``load_or_train`` reuses the one
at a path when its settings match.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image
from scipy import linalg, ndimage
from sklearn import neural_network

from pfm.data import moving_digits as md

THRESHOLD = 64  # uint8 level of a stroke pixel
HIDDEN_UNITS = 128
FILENAME = "digit_classifier.npz"  # the cached classifier's name in a workdir


@dataclasses.dataclass(frozen=True)
class ClassifierSettings:
  """What a classifier was trained for: digits of ``digit_size`` pixels on ``size`` canvases."""

  digit_size: int = 16
  size: int = 32
  num_examples: int = 4000
  seed: int = 0


@dataclasses.dataclass(frozen=True, eq=False)
class DigitClassifier:
  """The digit reader: 8x8 crops in [0, 16] (``[N, 64]``) -> hidden features -> class logits.

  Attributes:
    settings: what it was trained on.
    weights: float32 ``[64, 128]`` and ``[128, 10]``; biases ``[128]`` and ``[10]``.
  """

  settings: ClassifierSettings
  hidden_weights: np.ndarray
  hidden_bias: np.ndarray
  output_weights: np.ndarray
  output_bias: np.ndarray

  def features(self, digits8: np.ndarray) -> np.ndarray:
    """ReLU activations of the hidden layer: ``[N, 64]`` -> float32 ``[N, 128]``."""
    return np.maximum(np.asarray(digits8, np.float32) @ self.hidden_weights + self.hidden_bias,
                      0.0)

  def predict(self, digits8: np.ndarray) -> np.ndarray:
    """The digit read from each crop: ``[N, 64]`` -> int ``[N]`` in 0..9."""
    return np.argmax(self.features(digits8) @ self.output_weights + self.output_bias, axis=-1)

  def save(self, path: str) -> None:
    """Writes the classifier to ``path`` (``.npz``), atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **dataclasses.asdict(self.settings), hidden_weights=self.hidden_weights,
             hidden_bias=self.hidden_bias, output_weights=self.output_weights,
             output_bias=self.output_bias)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "DigitClassifier":
    """Reads a classifier written by `save`.

    Raises:
      FileNotFoundError: if there is no file at ``path``.
      ValueError: if the file is not a saved classifier.
    """
    with np.load(path) as f:
      try:
        settings = ClassifierSettings(**{
            field.name: int(f[field.name]) for field in dataclasses.fields(ClassifierSettings)})
        arrays = {name: f[name] for name in
                  ("hidden_weights", "hidden_bias", "output_weights", "output_bias")}
      except KeyError as e:
        raise ValueError(f"{path} is not a saved digit classifier (no {e})") from None
    return cls(settings, **arrays)


def train_classifier(settings: ClassifierSettings = ClassifierSettings()) -> DigitClassifier:
  """A classifier that reads digits as ``read_frame`` crops them (seconds on a CPU).

  Trained on single training-split digits pasted at random places of a ``settings.size``
  canvas and read back by ``read_frame``, so it sees exactly the crops it will be given (a
  classifier fitted to the centred 8x8 source images instead reads only about 28% of real clips).
  """
  s = settings
  images, labels = md.digit_images("train", s.digit_size)
  rng = np.random.default_rng(s.seed)
  which = rng.integers(0, len(images), s.num_examples)
  corners = rng.integers(0, s.size - s.digit_size + 1, (s.num_examples, 1, 1, 2))
  crops = [read_frame(md.render(images[j:j + 1], corner, s.size)[0], 1, s.digit_size).digits8[0]
           for j, corner in zip(which, corners)]
  mlp = neural_network.MLPClassifier(hidden_layer_sizes=(HIDDEN_UNITS,), max_iter=400,
                                     random_state=s.seed)
  mlp.fit(np.stack(crops), labels[which])
  if not np.array_equal(mlp.classes_, np.arange(10)):
    raise ValueError(f"the training crops hold only the classes {mlp.classes_.tolist()}")
  f32 = lambda a: np.asarray(a, np.float32)
  return DigitClassifier(s, f32(mlp.coefs_[0]), f32(mlp.intercepts_[0]), f32(mlp.coefs_[1]),
                         f32(mlp.intercepts_[1]))


def load_or_train(path: str, settings: ClassifierSettings) -> DigitClassifier:
  """The classifier cached at ``path`` if it was trained with ``settings``; else a new one,
  trained and saved there."""
  if os.path.exists(path):
    classifier = DigitClassifier.load(path)
    if classifier.settings == settings:
      return classifier
  classifier = train_classifier(settings)
  classifier.save(path)
  return classifier


@dataclasses.dataclass
class FrameReading:
  """The digits found in one frame: 8x8 crops ``[n, 64]`` in [0, 16] and centres ``[n, 2]``."""

  digits8: np.ndarray
  centres: np.ndarray


def read_frame(frame: np.ndarray, num_digits: int, digit_size: int) -> FrameReading:
  """Segments a uint8 ``[H, W, 3]`` frame into at most ``num_digits`` digits (largest blobs)."""
  gray = frame[..., 0].astype(np.float32) if frame.ndim == 3 else frame.astype(np.float32)
  mask = ndimage.binary_dilation(gray >= THRESHOLD, iterations=max(1, digit_size // 8))
  labels, count = ndimage.label(mask)
  if count == 0:
    return FrameReading(np.zeros((0, 64)), np.zeros((0, 2)))
  if count < num_digits:  # touching digits merged into one blob: split it by position
    labels, count = _split_blob(gray, labels, num_digits), num_digits
  sizes = ndimage.sum_labels(gray, labels, range(1, count + 1))
  keep = np.argsort(sizes)[::-1][:num_digits] + 1
  crops, centres = [], []
  h, w = gray.shape
  for lab in keep:
    blob = gray * (labels == lab)  # this digit only: a neighbour's strokes are masked out
    centre = np.asarray(ndimage.center_of_mass(blob))
    y0 = int(np.clip(round(centre[0] - digit_size / 2), 0, h - digit_size))
    x0 = int(np.clip(round(centre[1] - digit_size / 2), 0, w - digit_size))
    crop = blob[y0:y0 + digit_size, x0:x0 + digit_size] / 255.0
    small = np.asarray(Image.fromarray(crop).resize((8, 8), Image.Resampling.BOX))
    crops.append(np.clip(small, 0.0, 1.0).reshape(-1) * 16.0)
    centres.append(centre)
  return FrameReading(np.stack(crops), np.stack(centres))


def _split_blob(gray: np.ndarray, labels: np.ndarray, num_digits: int) -> np.ndarray:
  """Labels 1..num_digits from k-means (Lloyd, farthest-point start) on the stroke pixels'
  positions, weighted by brightness: overlapping digits are split along their centres."""
  ys, xs = np.nonzero(gray >= THRESHOLD)
  points = np.stack([ys, xs], 1).astype(np.float64)
  weight = gray[ys, xs].astype(np.float64)
  centres = [points[np.argmax(weight)]]
  while len(centres) < num_digits:
    distance = np.min([np.sum((points - c) ** 2, 1) for c in centres], axis=0)
    centres.append(points[np.argmax(distance)])
  centres = np.stack(centres)
  for _ in range(20):
    assign = np.argmin(((points[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    centres = np.stack([np.average(points[assign == j], axis=0, weights=weight[assign == j])
                        if np.any(assign == j) else centres[j] for j in range(num_digits)])
  out = np.zeros_like(labels)
  out[ys, xs] = assign + 1
  return out


def _clip_digits(classifier: DigitClassifier, readings: list[FrameReading],
                 num_digits: int) -> tuple[tuple[int, ...], float]:
  """The clip's digit multiset and the share of frames read as it.

  Counted over the frames where ``num_digits`` blobs stand apart (all frames if there are
  none), so that frames where two digits touch and merge do not decide the reading.
  """
  apart = [r for r in readings if len(r.digits8) == num_digits] or readings
  per_frame = [",".join(map(str, sorted(classifier.predict(r.digits8).tolist())))
               if len(r.digits8) else "" for r in apart]
  values, counts = np.unique(np.array(per_frame), return_counts=True)
  best = values[np.argmax(counts)]
  digits = tuple(int(v) for v in best.split(",")) if best else ()
  return digits, float(counts.max() / len(per_frame))


def clip_metrics(classifier: DigitClassifier, frames: np.ndarray, labels, directions,
                 digit_size: int) -> dict:
  """Metrics of one clip against its caption.

  Args:
    classifier: the digit reader.
    frames: uint8 ``[T, H, W, 3]``.
    labels: the named digits, int ``[n]`` (as ``MovingDigits`` gives them).
    directions: their named directions, int ``[n, 2]`` (dy, dx in -1, 0, 1).
    digit_size: the digits' side in pixels.

  Returns:
    ``{"prompt_ok": bool, "consistency": float in [0, 1], "direction_ok": bool | None,
    "smoothness": float | None}``; the last two are None for multi-digit clips and for clips
    with a frame where no digit is found.
  """
  labels = np.asarray(labels)
  readings = [read_frame(f, len(labels), digit_size) for f in frames]
  digits, consistency = _clip_digits(classifier, readings, len(labels))
  out = {"prompt_ok": digits == tuple(sorted(labels.tolist())), "consistency": consistency,
         "direction_ok": None, "smoothness": None}
  if len(labels) == 1 and all(len(r.centres) for r in readings):
    track = np.stack([r.centres[0] for r in readings])
    move = track[-1] - track[0]
    sign = np.where(np.abs(move) < 1.0, 0, np.sign(move)).astype(int)
    out["direction_ok"] = bool(np.array_equal(sign, np.asarray(directions)[0]))
    out["smoothness"] = (float(np.linalg.norm(np.diff(track, 2, axis=0), axis=1).mean())
                         if len(track) > 2 else 0.0)
  return out


def summarize(per_clip: list[dict]) -> dict:
  """Means over clips: ``prompt_accuracy``, ``identity_consistency``, ``direction_accuracy`` and
  ``motion_smoothness`` (the last two over the clips where they are defined; NaN when none)."""
  def mean(key):
    values = [c[key] for c in per_clip if c[key] is not None]
    return float(np.mean(values)) if values else float("nan")
  return {"prompt_accuracy": mean("prompt_ok"), "identity_consistency": mean("consistency"),
          "direction_accuracy": mean("direction_ok"), "motion_smoothness": mean("smoothness")}


def clip_features(classifier: DigitClassifier, frames: np.ndarray, num_digits: int,
                  digit_size: int) -> np.ndarray:
  """Hidden features of every digit found in every frame: float32 ``[n, 128]``."""
  crops = [read_frame(f, num_digits, digit_size).digits8 for f in frames]
  crops = np.concatenate([c for c in crops if len(c)] or [np.zeros((0, 64))])
  return classifier.features(crops)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)) of ``[N, D]`` feature sets.

  Raises:
    ValueError: if a set has fewer than 2 rows (no covariance).
  """
  if len(features_a) < 2 or len(features_b) < 2:
    raise ValueError(f"a Fréchet distance needs >= 2 feature rows per set, got "
                     f"{len(features_a)} and {len(features_b)}")
  features_a = np.asarray(features_a, np.float64)
  features_b = np.asarray(features_b, np.float64)
  mu_a, mu_b = features_a.mean(0), features_b.mean(0)
  eye = 1e-6 * np.eye(features_a.shape[1])  # dead ReLU units make the covariances singular
  cov_a = np.cov(features_a, rowvar=False) + eye
  cov_b = np.cov(features_b, rowvar=False) + eye
  root = linalg.sqrtm(cov_a @ cov_b)
  root = root.real if np.iscomplexobj(root) else root
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2.0 * root))


def score_clips(classifier: DigitClassifier, clips: list[np.ndarray], captions: list[dict],
                references: list[np.ndarray], digit_size: int) -> dict:
  """Every metric of a set of generated clips.

  Args:
    classifier: the digit reader.
    clips: generated uint8 ``[T, H, W, 3]`` clips, one per caption.
    captions: per clip, ``{"labels": [n], "directions": [n, 2]}`` of its prompt.
    references: held-out real uint8 clips for the Fréchet distance (the same number of digits
      per clip as the captions, on average).
    digit_size: the digits' side in pixels.

  Returns:
    ``summarize``'s means, ``frechet_distance`` (NaN when fewer than two digits are found in the
    generated clips) and ``per_clip``.
  """
  per_clip = [clip_metrics(classifier, c, k["labels"], k["directions"], digit_size)
              for c, k in zip(clips, captions, strict=True)]
  num_digits = max(len(k["labels"]) for k in captions)
  generated = np.concatenate([clip_features(classifier, c, num_digits, digit_size)
                              for c in clips])
  real = np.concatenate([clip_features(classifier, c, num_digits, digit_size)
                         for c in references])
  fd = frechet_distance(generated, real) if len(generated) >= 2 else float("nan")
  return summarize(per_clip) | {"frechet_distance": fd, "per_clip": per_clip}
