r"""Does a sample come from its prompted video? ``python -m pfm.evaluate --workdir=runs/demo``.

For each manifest record, generate a video from its caption and assign it to the training video
whose frames are nearest in pixel distance: the distance from a generated video to a training video
is the mean, over generated frames, of the mean squared pixel error to the nearest frame of that
training video (all its frames, at the training resolution). The score is the fraction of prompts
assigned to their own video; chance is 1 / (number of videos).
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
import numpy as np

from pfm import errors
from pfm import sample as sample_lib
from pfm.data import pipeline

FLAGS = flags.FLAGS


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


def prompt_to_video(sampler: sample_lib.Sampler, records: list[dict], *, seed: int = 0, **generate_kwargs) -> dict:
  """Generates one video per record caption and assigns each to its nearest training video.

  Returns:
    ``(result, videos)``: the generated uint8 videos and a JSON-able dict: ``accuracy`` (fraction of prompts landing on their own video), ``hits``,
    ``num_prompts``, ``assignment`` (per prompt: own record index -> assigned index) and the
    ``distances`` matrix.
  """
  cfg = sampler.config
  size = (cfg.data.height, cfg.data.width)
  references = [pipeline.record_frames(r, size) for r in records]
  generated = [sampler.generate(r["text"], seed=seed + n, progress=False, **generate_kwargs)
               for n, r in enumerate(records)]
  distances, assigned = nearest_video_assignment(generated, references)
  hits = int(np.sum(assigned == np.arange(len(records))))
  result = dict(accuracy=hits / len(records), hits=hits, num_prompts=len(records),
                assignment=[int(a) for a in assigned], distances=distances.round(5).tolist(),
                captions=[r["text"] for r in records])
  return result, generated


def main(argv):
  del argv
  errors.quiet_library_tracebacks()
  sampler = sample_lib.Sampler.from_workdir(FLAGS.workdir, FLAGS.step)
  records = pipeline.load_records(sampler.spec)[0][:sampler.config.sample.num_videos]
  result, _ = prompt_to_video(sampler, records, seed=FLAGS.seed)
  print(json.dumps(result, indent=2))
  with open(os.path.join(FLAGS.workdir, "prompt_to_video.json"), "w") as f:
    json.dump(result, f, indent=2)
  logging.info("prompt-to-video: %d of %d prompts land on their own video", result["hits"],
               result["num_prompts"])


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A pfm.train workdir.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_integer("seed", 0, "Sampling seed of the first prompt.")
  flags.mark_flags_as_required(["workdir"])
  app.run(errors.exit_on_user_error(main, "pfm.evaluate"))
