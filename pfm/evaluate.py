r"""Scores of a trained model's samples: ``python -m pfm.evaluate --workdir=runs/demo``.

Generates one video per evaluation caption and scores the set, with metrics that need no
download (``pfm.metrics``):

* **Real videos** (a manifest, or the default videos): the *prompt-to-video accuracy* (each
  generated video is assigned to the training video whose frames are nearest in pixel distance:
  the mean, over generated frames, of the mean squared error to the nearest frame of that video;
  the score is the fraction of prompts assigned to their own video, chance 1 / number of videos)
  and the *sliced Wasserstein distance* of Laplacian-pyramid patches (``pfm.metrics.swd``)
  between the generated frames and the frames of the captions' videos (every frame, at the
  training resolution: for the three default videos these are the training videos themselves).
* **Moving Digits** (``data.dataset = "moving_digits"``): the captions of the first
  ``num_prompts`` clips of the *test* split, scored by ``pfm.metrics.digits`` (prompt accuracy,
  identity consistency, direction accuracy, motion smoothness) with a digit classifier cached in
  the workdir (``digit_classifier.npz``; trained there in seconds if missing), the Fréchet
  distance in that classifier's features and the sliced Wasserstein distance, both against the
  test split's first ``max(num_prompts, 64)`` real clips (held-out handwriting).
* **Both**: the *seam ratio* on the model's patch grid (``pfm.metrics.seams``): steps across
  patch borders over steps inside patches, about 1 for real frames (``seam_ratio_real``, the
  reference clips' own ratio) and above 1 where the patch grid shows.

Writes ``metrics.json`` (``--output``, default in the workdir; its folder is made) and prints
it; ``--frames=PATH.png`` also writes the generated frames as one image. ``--norenoise``
samples without the corrective noise at the jump points (the ablation of
Pyramidal Flow Fig. 10).
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
import numpy as np
from tqdm.auto import tqdm

from pfm import errors
from pfm import sample as sample_lib
from pfm import spec as spec_lib
from pfm.data import pipeline
from pfm.data import video as video_lib
from pfm.metrics import digits as digits_lib
from pfm.metrics import seams as seams_lib
from pfm.metrics import swd as swd_lib

FLAGS = flags.FLAGS
METRICS_FILE = "metrics.json"
MIN_DIGIT_REFERENCES = 64  # real test clips the Fréchet distance and the SWD compare with


def video_distance(generated: np.ndarray, reference: np.ndarray) -> float:
  """Mean over generated frames of the MSE (pixels in [0, 1]) to the nearest reference frame.

  Args:
    generated: uint8 ``[T, H, W, 3]``.
    reference: uint8 ``[N, H, W, 3]`` at the same resolution.
  """
  g = generated.reshape(len(generated), -1).astype(np.float32) / 255.0
  r = reference.reshape(len(reference), -1).astype(np.float32) / 255.0
  d = (np.sum(g * g, 1)[:, None] + np.sum(r * r, 1)[None] - 2.0 * g @ r.T) / g.shape[1]
  return float(np.mean(np.min(d, axis=1)))


def nearest_video_assignment(generated: list[np.ndarray], references: list[np.ndarray]):
  """Distances ``[G, R]`` and, per generated video, the index of the nearest reference video."""
  d = np.array([[video_distance(g, r) for r in references] for g in generated])
  return d, np.argmin(d, axis=1)


def is_moving_digits(spec: spec_lib.RunSpec) -> bool:
  return spec.config.data.dataset == "moving_digits"


def evaluation_records(spec: spec_lib.RunSpec, num_prompts: int) -> list[dict]:
  """The records whose captions are evaluated: the first ``num_prompts`` of the training
  records (real videos) or of the Moving Digits test split."""
  if is_moving_digits(spec):
    test = pipeline.moving_digits(spec.config, "test")
    return [{"index": i, "text": test[i]["text"]} for i in range(min(num_prompts, len(test)))]
  if spec.latent:  # the videos the features were extracted from
    return pipeline.feature_source_records(spec)[:num_prompts]
  return pipeline.load_records(spec)[0][:num_prompts]


def _digit_clip(spec: spec_lib.RunSpec, clip: dict) -> np.ndarray:
  """A test clip's frames as a training clip takes them (every ``frame_stride``-th)."""
  data = spec.config.data
  return clip["frames"][::data.frame_stride][:data.num_frames]


def classifier_settings(spec: spec_lib.RunSpec) -> digits_lib.ClassifierSettings:
  """The digit classifier a Moving Digits run is scored with: its frame and digit sizes."""
  data = spec.config.data
  return digits_lib.ClassifierSettings(
      digit_size=data.moving_digits.digit_size or data.height // 2, size=data.height)


def generate(sampler: sample_lib.Sampler, records: list[dict], *, seed: int = 0,
             progress: bool = False, **generate_kwargs) -> list[np.ndarray]:
  """One video per record caption (seed ``seed + n`` for the n-th), uint8 ``[T, H, W, 3]``."""
  return [sampler.generate(r["text"], seed=seed + n, progress=False, **generate_kwargs)
          for n, r in enumerate(tqdm(records, desc="prompts", disable=not progress))]


def score(spec: spec_lib.RunSpec, records: list[dict], videos: list[np.ndarray], *,
          classifier: digits_lib.DigitClassifier | None = None) -> dict:
  """Every metric of ``videos`` generated from the captions of ``records``.

  Args:
    spec: the run's spec.
    records: from `evaluation_records`.
    videos: uint8 ``[T, H, W, 3]``, one per record.
    classifier: the digit classifier (Moving Digits; None = trained now).

  Returns:
    A JSON-able dict. Real videos: ``prompt_to_video_accuracy``, ``hits``, ``assignment``
    (per prompt, the assigned record index), ``distances`` ``[G, R]``, ``swd`` (the per-level
    and ``avg`` SWD x 10^3). Moving Digits: ``prompt_accuracy``, ``identity_consistency``,
    ``direction_accuracy``, ``motion_smoothness``, ``frechet_distance``, ``swd``, ``per_clip``.
    Both: ``num_prompts``, ``captions``, and ``seam_ratio`` on the model's patch grid
    (``pfm.metrics.seams``) of the generated frames and (``seam_ratio_real``) of the real ones;
    ``seam_ratio_by_period``: ``{str(p 2^k): ratio}`` of the patch grid of each spatial stage
    k at full size (``seams.seam_ratios_by_period``).
  """
  cfg = spec.config
  result = {"num_prompts": len(records), "captions": [r["text"] for r in records]}
  frames = np.concatenate(videos)
  if is_moving_digits(spec):
    test = pipeline.moving_digits(cfg, "test")
    reference_clips = [_digit_clip(spec, test[i])
                       for i in range(min(len(test), max(len(records), MIN_DIGIT_REFERENCES)))]
    captions = [test[r["index"]] for r in records]
    classifier = classifier or digits_lib.train_classifier(classifier_settings(spec))
    result |= digits_lib.score_clips(classifier, videos, captions, reference_clips,
                                     classifier.settings.digit_size)
    references = np.concatenate(reference_clips)
  else:
    size = (cfg.data.height, cfg.data.width)
    reference_videos = [pipeline.record_frames(r, size) for r in records]
    distances, assigned = nearest_video_assignment(videos, reference_videos)
    hits = int(np.sum(assigned == np.arange(len(records))))
    result |= dict(prompt_to_video_accuracy=hits / len(records), hits=hits,
                   assignment=[int(a) for a in assigned], distances=distances.round(5).tolist())
    references = np.concatenate(reference_videos)
  result["swd"] = swd_lib.sliced_wasserstein(frames, references)
  # The patch grid in pixels: a latent run's patches cover f_s x f_s pixels per latent pixel.
  patch = int(cfg.model.patch_size) * (cfg.latent.spatial_compression if spec.latent else 1)
  result["seam_ratio"] = seams_lib.seam_ratio(frames, patch)
  result["seam_ratio_real"] = seams_lib.seam_ratio(references, patch)
  periods = [patch * f for f in spec.pyramid.spatial_factors
             if patch * f < min(cfg.data.height, cfg.data.width)]
  result["seam_ratio_by_period"] = {
      str(p): r for p, r in seams_lib.seam_ratios_by_period(frames, periods).items()}
  return result


def scalars(result: dict) -> dict[str, float]:
  """The headline numbers of a `score` result, as ``eval/...`` scalars for the metric writers."""
  names = ("prompt_to_video_accuracy", "prompt_accuracy", "identity_consistency",
           "direction_accuracy", "motion_smoothness", "frechet_distance", "seam_ratio")
  out = {f"eval/{name}": float(result[name]) for name in names if name in result}
  out |= {f"eval/swd_{level}": float(v) for level, v in result["swd"].items()}
  return out


def summary(result: dict) -> str:
  """One line of the headline numbers."""
  return ", ".join(f"{k.removeprefix('eval/')}={v:.4g}" for k, v in scalars(result).items())


def main(argv):
  del argv
  errors.quiet_library_tracebacks()
  sampler = sample_lib.Sampler.from_workdir(FLAGS.workdir, FLAGS.step)
  if FLAGS.renoise is not None:  # the ablation of Pyramidal Flow Fig. 10
    sampler.renoise = FLAGS.renoise
  spec = sampler.spec
  records = evaluation_records(spec, FLAGS.num_prompts or spec.config.sample.num_videos)
  classifier = None
  if is_moving_digits(spec):
    path = FLAGS.classifier or os.path.join(FLAGS.workdir, digits_lib.FILENAME)
    classifier = digits_lib.load_or_train(path, classifier_settings(spec))
  videos = generate(sampler, records, seed=FLAGS.seed, progress=True)
  result = score(spec, records, videos, classifier=classifier)
  result["sampling"] = {"renoise": sampler.renoise, "seed": FLAGS.seed, "step": FLAGS.step}
  print(json.dumps(result, indent=2))
  if FLAGS.frames:
    video_lib.write_frame_grid(FLAGS.frames, videos, every=FLAGS.frames_every, scale=2)
  output = FLAGS.output or os.path.join(FLAGS.workdir, METRICS_FILE)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, "w") as f:
    json.dump(result, f, indent=2)
  logging.info("%d prompts: %s (written to %s)", len(records), summary(result), output)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A pfm.train workdir.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_integer("seed", 0, "Sampling seed of the first prompt.")
  flags.DEFINE_integer("num_prompts", None, "Captions to sample (default: sample.num_videos).")
  flags.DEFINE_string("classifier", None, "Moving Digits: the digit classifier (.npz) to read "
                      "the samples with; trained and saved there if missing (default: "
                      "WORKDIR/digit_classifier.npz).")
  flags.DEFINE_string("output", None, "Where to write the scores (default: WORKDIR/metrics.json).")
  flags.DEFINE_string("frames", None, "Also write the generated videos as one PNG here, a row "
                      "per prompt (lossless frames, each pixel enlarged 2x).")
  flags.DEFINE_integer("frames_every", 3, "Frame stride of --frames.")
  flags.DEFINE_boolean("renoise", None, "Corrective noise at the jump points (default: the run's "
                       "sample.renoise); --norenoise samples without it (Pyramidal Flow Fig. 10).")
  flags.mark_flags_as_required(["workdir"])
  app.run(errors.exit_on_user_error(main, "pfm.evaluate"))
