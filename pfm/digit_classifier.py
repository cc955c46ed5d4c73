r"""The Moving Digits classifier: ``python -m pfm.digit_classifier --workdir=runs/digits``.

Trains the digit reader of ``pfm.metrics.digits`` (seconds on a CPU) and saves it as an ``.npz``
of plain arrays, where ``pfm.evaluate`` and training-time sampling look for it:

  python -m pfm.digit_classifier --workdir=runs/digits       # sizes from the run's config
  python -m pfm.digit_classifier --output=/tmp/reader.npz --size=64 --digit_size=16

With ``--workdir`` the frame and digit sizes come from ``WORKDIR/config.json`` and the file is
``WORKDIR/digit_classifier.npz``; an existing classifier with the same settings is kept
(``--retrain`` replaces it). Prints the classifier's accuracy on the crops of held-out
(test-split) digits.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
import ml_collections
import numpy as np

from pfm import errors
from pfm import evaluate
from pfm import spec as spec_lib
from pfm.data import moving_digits as md
from pfm.metrics import digits as digits_lib

FLAGS = flags.FLAGS


def held_out_accuracy(classifier: digits_lib.DigitClassifier, num_examples: int = 1000,
                      seed: int = 1) -> float:
  """Accuracy on test-split digits pasted at random places and read back by ``read_frame``."""
  s = classifier.settings
  images, labels = md.digit_images("test", s.digit_size)
  rng = np.random.default_rng(seed)
  which = rng.integers(0, len(images), num_examples)
  corners = rng.integers(0, s.size - s.digit_size + 1, (num_examples, 1, 1, 2))
  crops = np.stack([digits_lib.read_frame(md.render(images[j:j + 1], c, s.size)[0], 1,
                                          s.digit_size).digits8[0]
                    for j, c in zip(which, corners)])
  return float(np.mean(classifier.predict(crops) == labels[which]))


def main(argv):
  del argv
  errors.quiet_library_tracebacks()
  if bool(FLAGS.workdir) == bool(FLAGS.output):
    raise errors.UserError("give one of --workdir (a Moving Digits run) or --output (a path)")
  if FLAGS.workdir:
    path = os.path.join(FLAGS.workdir, "config.json")
    if not os.path.exists(path):
      raise errors.NotAWorkdirError(f"{path} not found: is {FLAGS.workdir} a pfm.train workdir?")
    with open(path) as f:
      spec = spec_lib.resolve(ml_collections.ConfigDict(json.load(f)))
    if not evaluate.is_moving_digits(spec):
      raise errors.UserError(f"{FLAGS.workdir} does not train on Moving Digits "
                             "(config.data.dataset)")
    settings, output = (evaluate.classifier_settings(spec),
                        os.path.join(FLAGS.workdir, digits_lib.FILENAME))
  else:
    settings = digits_lib.ClassifierSettings(digit_size=FLAGS.digit_size, size=FLAGS.size,
                                             num_examples=FLAGS.num_examples, seed=FLAGS.seed)
    output = FLAGS.output
  if FLAGS.retrain and os.path.exists(output):
    os.remove(output)
  classifier = digits_lib.load_or_train(output, settings)
  accuracy = held_out_accuracy(classifier)
  print(json.dumps({"path": output, "held_out_accuracy": accuracy} | vars(settings)))
  logging.info("digit classifier %s: %.3f on held-out digits", output, accuracy)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A Moving Digits pfm.train workdir.")
  flags.DEFINE_string("output", None, "Where to write the classifier (.npz), without a workdir.")
  flags.DEFINE_integer("size", 32, "Frame side in pixels (with --output).")
  flags.DEFINE_integer("digit_size", 16, "Digit side in pixels (with --output).")
  flags.DEFINE_integer("num_examples", 4000, "Training crops (with --output).")
  flags.DEFINE_integer("seed", 0, "Training seed (with --output).")
  flags.DEFINE_bool("retrain", False, "Replace an existing classifier.")
  app.run(errors.exit_on_user_error(main, "pfm.digit_classifier"))
