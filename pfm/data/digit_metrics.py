"""Download-free metrics for Moving Digits clips: which digits, how they move, how real they look.

A small classifier trained on the training split's source digits (scikit-learn's
``MLPClassifier`` on the 8x8 crops that ``read_frame`` makes of rendered training digits,
``train_classifier``, seconds on a CPU) reads the digits of a clip. Each frame is
segmented into bright blobs (``scipy.ndimage.label`` after a dilation that joins a digit's
strokes); each of the largest ``num_digits`` blobs is cropped around its centre of mass at the
digit size, reduced to 8x8 and classified. From this:

* ``prompt_accuracy``: the clip's digits (most frequent reading over its frames) are the named
  ones (about 97% for real one-digit test clips; two digits that touch merge into one blob, so
  real two-digit clips read about 45%);
* ``identity_consistency``: the fraction of frames read as the clip's digits;
* ``direction_accuracy``: for one-digit clips, the sign of the centre-of-mass displacement from
  the first to the last frame matches the named direction on both axes;
* ``motion_smoothness``: the mean magnitude of the second difference of that centre of mass
  (pixels per frame^2; 0 for constant-velocity motion);
* ``frechet_distance``: the Fréchet distance between Gaussians fitted to the classifier's hidden
  features of the frames of two sets of clips (an FVD-like score; Heusel et al., 2017).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image
from scipy import linalg, ndimage
from sklearn import neural_network

from pfm.data import moving_digits as md

THRESHOLD = 64  # uint8 level of a stroke pixel


def train_classifier(digit_size: int = 16, size: int = 32, num_examples: int = 4000,
                     seed: int = 0) -> neural_network.MLPClassifier:
  """An MLP that reads digits as ``read_frame`` crops them (seconds on a CPU).

  Trained on single training-split digits pasted at random places of a ``size`` canvas and read
  back by ``read_frame``, so the classifier sees exactly the crops it will be given.
  """
  images, labels = md.digit_images("train", digit_size)
  rng = np.random.default_rng(seed)
  which = rng.integers(0, len(images), num_examples)
  corners = rng.integers(0, size - digit_size + 1, (num_examples, 1, 1, 2))
  crops = [read_frame(md.render(images[j:j + 1], corner, size)[0], 1, digit_size).digits8[0]
           for j, corner in zip(which, corners)]
  classifier = neural_network.MLPClassifier(hidden_layer_sizes=(128,), max_iter=400,
                                            random_state=seed)
  classifier.fit(np.stack(crops), labels[which])
  return classifier


def hidden_features(classifier: neural_network.MLPClassifier, digits8: np.ndarray) -> np.ndarray:
  """ReLU activations of the classifier's hidden layer: ``[N, 64]`` inputs -> ``[N, 128]``."""
  return np.maximum(digits8 @ classifier.coefs_[0] + classifier.intercepts_[0], 0.0)


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
  sizes = ndimage.sum_labels(gray, labels, range(1, count + 1))
  keep = np.argsort(sizes)[::-1][:num_digits] + 1
  crops, centres = [], []
  h, w = gray.shape
  for lab in keep:
    centre = np.asarray(ndimage.center_of_mass(gray * (labels == lab)))
    y0 = int(np.clip(round(centre[0] - digit_size / 2), 0, h - digit_size))
    x0 = int(np.clip(round(centre[1] - digit_size / 2), 0, w - digit_size))
    crop = gray[y0:y0 + digit_size, x0:x0 + digit_size] / 255.0
    small = np.asarray(Image.fromarray(crop).resize((8, 8), Image.Resampling.BOX))
    crops.append(np.clip(small, 0.0, 1.0).reshape(-1) * 16.0)
    centres.append(centre)
  return FrameReading(np.stack(crops), np.stack(centres))


def _clip_digits(classifier, readings: list[FrameReading]) -> tuple[tuple[int, ...], float]:
  """The clip's digit multiset (most frequent per-frame reading) and the share of such frames."""
  per_frame = [tuple(sorted(classifier.predict(r.digits8).tolist())) if len(r.digits8) else ()
               for r in readings]
  values, counts = np.unique(np.array([",".join(map(str, p)) for p in per_frame]),
                             return_counts=True)
  best = values[np.argmax(counts)]
  digits = tuple(int(v) for v in best.split(",")) if best else ()
  return digits, float(counts.max() / len(per_frame))


def clip_metrics(classifier, frames: np.ndarray, labels, directions, digit_size: int) -> dict:
  """Metrics of one clip against its caption (``labels`` and ``directions`` as in
  ``MovingDigits``). ``direction_ok`` and ``smoothness`` are None for multi-digit clips."""
  labels = np.asarray(labels)
  readings = [read_frame(f, len(labels), digit_size) for f in frames]
  digits, consistency = _clip_digits(classifier, readings)
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
  ``motion_smoothness`` (the last two over one-digit clips; NaN when there are none)."""
  def mean(key):
    values = [c[key] for c in per_clip if c[key] is not None]
    return float(np.mean(values)) if values else float("nan")
  return {"prompt_accuracy": mean("prompt_ok"), "identity_consistency": mean("consistency"),
          "direction_accuracy": mean("direction_ok"), "motion_smoothness": mean("smoothness")}


def clip_features(classifier, frames: np.ndarray, num_digits: int, digit_size: int) -> np.ndarray:
  """Hidden features of every digit found in every frame: ``[n, 128]``."""
  crops = [read_frame(f, num_digits, digit_size).digits8 for f in frames]
  crops = np.concatenate([c for c in crops if len(c)] or [np.zeros((0, 64))])
  return hidden_features(classifier, crops)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)) of ``[N, D]`` feature sets."""
  mu_a, mu_b = features_a.mean(0), features_b.mean(0)
  eye = 1e-6 * np.eye(features_a.shape[1])  # dead ReLU units make the covariances singular
  cov_a = np.cov(features_a, rowvar=False) + eye
  cov_b = np.cov(features_b, rowvar=False) + eye
  root = linalg.sqrtm(cov_a @ cov_b)
  root = root.real if np.iscomplexobj(root) else root
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2.0 * root))
