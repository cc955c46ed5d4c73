r"""Ablation results from training logs: ``python -m pfm.results --runs=runs/digits --output=docs``.

Reads every run under ``--runs`` (a folder of sweeps, each a folder of ``pfm.train`` workdirs,
as ``launch.sweep`` lays them out: ``runs/digits/fig7/spatial,seed=0``), takes from each run's
metric-writer events its ``eval/...`` scores at every sample step and the training compute
logged at that step (``compute/train_pflop``: analytic model FLOPs of the train steps so far,
``compute/train_seconds``: the loop's wall time without sampling), and writes per sweep

* ``results/SWEEP.png``: one panel per metric, each arm's score against training compute
  (the mean over its seeds, with their range shaded);
* ``results/SWEEP.md``: a table of each arm's final scores (mean and, with several seeds, the
  spread) and its compute, and the compute at which each arm first reaches the score that the
  arm listed first reaches at its end (interpolated along the curves).

A run is ``ARM,seed=N`` (seeds of one arm are averaged) or any other name (an arm of its own).
Arms are listed by name, or, with ``--config=configs/digits.py``, in the order of that config's
sweep of the same name (its first arm is the reference of the compute-to-reach table).

A sweep of *sampling* ablations (e.g. renoising on and off at the jump points, Pyramidal Flow
Fig. 10) holds no training logs but one ``RUN/metrics.json`` per run (``pfm.evaluate
--output=...``); it gets a table of those scores and a bar plot (``results/SWEEP.md``, ``.png``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re

from absl import app, flags, logging
import numpy as np

from pfm import evaluate  # its scalars() name the scores as training logs them
from pfm.pyramid import coupling

FLAGS = flags.FLAGS

# (tag, label, better): the scores plotted and tabled, in order.
METRICS = (
    ("eval/frechet_distance", "Fréchet distance (digit features)", "lower"),
    ("eval/swd_avg", "SWD x 1e3 (Laplacian patches)", "lower"),
    ("eval/direction_accuracy", "direction accuracy", "higher"),
    ("eval/motion_smoothness", "motion smoothness (px/frame²)", "lower"),
    ("eval/prompt_accuracy", "prompt accuracy", "higher"),
    ("eval/identity_consistency", "identity consistency", "higher"),
    ("eval/prompt_to_video_accuracy", "prompt-to-video accuracy", "higher"),
)
COMPUTE = ("compute/train_pflop", "compute/train_seconds")
METRICS_FILE = "metrics.json"  # pfm.evaluate's output
_SEED = re.compile(r"^(?P<arm>.*),seed=(?P<seed>\d+)$")


@dataclasses.dataclass(frozen=True)
class Curve:
  """One run's scores along training.

  Attributes:
    steps: int ``[n]``, the sample steps.
    scores: per tag, float ``[n]`` (NaN where a score was not logged).
    compute: per `COMPUTE` tag, float ``[n]``: the compute logged at those steps.
  """

  steps: np.ndarray
  scores: dict[str, np.ndarray]
  compute: dict[str, np.ndarray]


def read_scalars(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Every scalar of a run's metric-writer event files: ``{tag: (steps, values)}``.

  Raises:
    FileNotFoundError: if the folder holds no event file.
  """
  from tensorboard.backend.event_processing import event_accumulator  # TensorBoard's reader
  from tensorboard.util import tensor_util

  if not any(f.startswith("events.out.tfevents") for f in os.listdir(workdir)):
    raise FileNotFoundError(f"no metric-writer event file in {workdir}")
  acc = event_accumulator.EventAccumulator(
      workdir, size_guidance={event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 0,
                              event_accumulator.IMAGES: 1})
  acc.Reload()
  out = {}
  for tag in acc.Tags()["tensors"]:
    events = acc.Tensors(tag)
    values = [tensor_util.make_ndarray(e.tensor_proto) for e in events]
    if all(v.size == 1 and np.issubdtype(v.dtype, np.number) for v in values):
      out[tag] = (np.array([e.step for e in events]), np.array([float(v) for v in values]))
  for tag in acc.Tags()["scalars"]:  # writers that log plain scalar summaries
    events = acc.Scalars(tag)
    out[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events]))
  return out


def curve(scalars: dict[str, tuple[np.ndarray, np.ndarray]]) -> Curve:
  """The scores at the sample steps, with the compute at those steps (interpolated between
  log steps, which include every sample step when the log interval divides the sample one)."""
  eval_tags = [t for t, _, _ in METRICS if t in scalars]
  if not eval_tags:
    raise ValueError("the run logged no eval/ scores")
  steps = np.unique(np.concatenate([scalars[t][0] for t in eval_tags]))
  scores = {}
  for tag in eval_tags:
    s, v = scalars[tag]
    last = {int(a): b for a, b in zip(s, v)}  # a rewritten step keeps its last value
    scores[tag] = np.array([last.get(int(step), np.nan) for step in steps])
  compute = {}
  for tag in COMPUTE:
    if tag in scalars:
      s, v = scalars[tag]
      order = np.argsort(s, kind="stable")
      compute[tag] = np.interp(steps, s[order], v[order])
  return Curve(steps, scores, compute)


def arm_and_seed(run_name: str) -> tuple[str, int | None]:
  """``"spatial,seed=1"`` -> ``("spatial", 1)``; other names are an arm without a seed."""
  m = _SEED.match(run_name)
  return (m["arm"], int(m["seed"])) if m else (run_name, None)


def _ordered(arms: dict[str, dict], order: list[str] | None) -> dict[str, dict]:
  """``arms`` with the names of ``order`` first, in that order, then the rest by name."""
  order = [a for a in (order or []) if a in arms]
  return {a: arms[a] for a in order + sorted(set(arms) - set(order))}


def _is_evaluation(path: str) -> bool:
  return (os.path.isfile(os.path.join(path, METRICS_FILE))
          and not any(f.startswith("events.out.tfevents") for f in os.listdir(path)))


def load_sweep(folder: str, order: list[str] | None = None) -> dict[str, dict[int | None, Curve]]:
  """``{arm: {seed: Curve}}`` of the runs in ``folder`` (arms in ``order``, then by name; runs
  without scores are skipped with a warning)."""
  arms: dict[str, dict] = collections.defaultdict(dict)
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if not os.path.isdir(path) or _is_evaluation(path):
      continue
    try:
      c = curve(read_scalars(path))
    except (FileNotFoundError, ValueError) as e:
      logging.warning("skipping %s: %s", path, e)
      continue
    arm, seed = arm_and_seed(name)
    arms[arm][seed] = c
  return _ordered(arms, order)


def load_evaluations(folder: str, order: list[str] | None = None
                     ) -> dict[str, dict[int | None, dict[str, float]]]:
  """``{arm: {seed: {eval/ tag: score}}}`` of the ``RUN/metrics.json`` files in ``folder`` that
  have no training logs beside them (`pfm.evaluate` results)."""
  arms: dict[str, dict] = collections.defaultdict(dict)
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if os.path.isdir(path) and _is_evaluation(path):
      with open(os.path.join(path, METRICS_FILE)) as f:
        scores = evaluate.scalars(json.load(f))
      arm, seed = arm_and_seed(name)
      arms[arm][seed] = scores
  return _ordered(arms, order)


def evaluation_table(arms: dict[str, dict[int | None, dict[str, float]]]) -> str:
  """Markdown: each arm's scores (mean and, with several seeds, their spread)."""
  tags = [t for t, _, _ in METRICS if any(t in r for runs in arms.values() for r in runs.values())]
  labels = {t: label for t, label, _ in METRICS}
  head = ["arm", "seeds"] + [labels[t] for t in tags]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for arm, runs in arms.items():
    row = [arm, str(len(runs))] + [_fmt([r[t] for r in runs.values() if t in r]) for t in tags]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def evaluation_plot(arms: dict[str, dict[int | None, dict[str, float]]], path: str,
                    title: str) -> None:
  """One panel per metric: a bar per arm (mean over seeds), each seed a dot."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  tags = [(t, label, b) for t, label, b in METRICS
          if any(t in r for runs in arms.values() for r in runs.values())]
  cols = min(3, len(tags))
  rows = -(-len(tags) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
  for ax, (tag, label, better) in zip(axes.flat, tags):
    for i, runs in enumerate(arms.values()):
      values = [r[tag] for r in runs.values() if tag in r]
      ax.bar(i, np.mean(values), color=f"C{i}", alpha=0.7)
      ax.plot([i] * len(values), values, "k.", markersize=4)
    ax.set_xticks(range(len(arms)), list(arms), fontsize=7)
    ax.set_title(f"{label} ({better} is better)", fontsize=9)
    ax.tick_params(labelsize=7)
  for ax in list(axes.flat)[len(tags):]:
    ax.axis("off")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def mean_curve(runs: dict[int | None, Curve], tag: str, x: str):
  """Seeds of one arm on their common steps: ``(x, mean, low, high)``, each ``[n]``."""
  common = sorted(set.intersection(*(set(c.steps.tolist()) for c in runs.values())))
  pick = lambda c, values: np.array([values[list(c.steps).index(s)] for s in common])
  xs = np.mean([pick(c, c.compute[x]) if x in c.compute else np.array(common, float)
                for c in runs.values()], axis=0)
  ys = np.stack([pick(c, c.scores.get(tag, np.full(len(c.steps), np.nan)))
                 for c in runs.values()])
  return xs, ys.mean(0), ys.min(0), ys.max(0)


def compute_to_reach(xs: np.ndarray, ys: np.ndarray, target: float, better: str) -> float:
  """The compute at which a curve first reaches ``target`` (linear between sample points);
  NaN if it never does."""
  ok = ys <= target if better == "lower" else ys >= target
  if not np.any(ok):
    return float("nan")
  i = int(np.argmax(ok))
  if i == 0:
    return float(xs[0])
  y0, y1 = ys[i - 1], ys[i]
  frac = 1.0 if y1 == y0 else (target - y0) / (y1 - y0)
  return float(xs[i - 1] + frac * (xs[i] - xs[i - 1]))


def _fmt(values: list[float]) -> str:
  values = [v for v in values if np.isfinite(v)]
  if not values:
    return "-"
  if len(values) == 1:
    return f"{values[0]:.3g}"
  return f"{np.mean(values):.3g} ± {np.std(values):.2g}"


def table(arms: dict[str, dict[int | None, Curve]], x: str = COMPUTE[0]) -> str:
  """Markdown: each arm's final scores, its compute, and the compute to reach the first arm's
  final score of each metric (relative to the first arm's own)."""
  tags = [t for t, _, _ in METRICS if any(t in c.scores for r in arms.values()
                                          for c in r.values())]
  labels = {t: label for t, label, _ in METRICS}
  better = {t: b for t, _, b in METRICS}
  head = ["arm", "seeds", "steps", "PFLOP", "train s"] + [labels[t] for t in tags]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for arm, runs in arms.items():
    last = [c for c in runs.values()]
    row = [arm, str(len(runs)), str(int(min(c.steps[-1] for c in last))),
           _fmt([c.compute.get(COMPUTE[0], [np.nan])[-1] for c in last]),
           _fmt([c.compute.get(COMPUTE[1], [np.nan])[-1] for c in last])]
    row += [_fmt([c.scores[t][-1] for c in last if t in c.scores]) for t in tags]
    lines.append("| " + " | ".join(row) + " |")
  first = next(iter(arms))
  lines += ["", f"Compute ({x}) at which each arm first reaches `{first}`'s final score "
            f"(its mean over seeds); `-` = not reached:", ""]
  head = ["arm"] + [labels[t] for t in tags]
  lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for arm, runs in arms.items():
    row = [arm]
    for t in tags:
      _, ref, _, _ = mean_curve(arms[first], t, x)
      xs, ys, _, _ = mean_curve(runs, t, x)
      reach = compute_to_reach(xs, ys, ref[-1], better[t])
      row.append("-" if not np.isfinite(reach) else f"{reach:.3g}")
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def plot(arms: dict[str, dict[int | None, Curve]], path: str, title: str,
         x: str = COMPUTE[0]) -> None:
  """One panel per metric: each arm's mean score against ``x``, the seeds' range shaded."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  tags = [(t, label, b) for t, label, b in METRICS
          if any(t in c.scores for r in arms.values() for c in r.values())]
  cols = min(3, len(tags))
  rows = -(-len(tags) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
  for ax, (tag, label, better) in zip(axes.flat, tags):
    for arm, runs in arms.items():
      xs, mean, low, high = mean_curve(runs, tag, x)
      (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=arm)
      if len(runs) > 1:
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2)
    ax.set_title(f"{label} ({better} is better)", fontsize=9)
    ax.set_xlabel("training PFLOP" if x == COMPUTE[0] else x, fontsize=8)
    ax.tick_params(labelsize=7)
  for ax in list(axes.flat)[len(tags):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=7)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_sweep(folder: str, output: str, order: list[str] | None = None) -> str | None:
  """Writes ``output/results/NAME.png`` and ``.md`` for the sweep in ``folder`` (training runs,
  or else `pfm.evaluate` results); returns the table (None when no run has scores)."""
  name = os.path.basename(os.path.normpath(folder))
  out_dir = os.path.join(output, "results")
  arms = load_sweep(folder, order)
  if arms:
    plot(arms, os.path.join(out_dir, f"{name}.png"), name)
    text = table(arms)
  elif evaluations := load_evaluations(folder, order):
    evaluation_plot(evaluations, os.path.join(out_dir, f"{name}.png"), name)
    text = evaluation_table(evaluations)
  else:
    return None
  with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
    f.write(text)
  return text


def write_coupling_toy(output: str, num_stages: int = 3) -> str:
  """The toy of Pyramidal Flow Fig. 13 (``pfm.pyramid.coupling``): trajectories of the exact
  flow with coupled and with independent endpoint noise (``results/coupling_toy.png``) and each
  stage's straightness and one-step error (``results/coupling_toy.md``, returned)."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  data = coupling.toy_data()
  flows = {name: coupling.integrate(data, num_stages, name == "coupled")
           for name in ("coupled", "independent")}
  fig, axes = plt.subplots(1, 2, figsize=(8.4, 4.2))
  for ax, (name, flow) in zip(axes, flows.items()):
    for order, path in enumerate(flow.paths):  # coarsest stage first
      ax.plot(path[:, :150, 0], path[:, :150, 1], color=f"C{order}", lw=0.4, alpha=0.5)
    ax.plot(*data.points.T, "k.", markersize=6)
    ax.set_title(f"{name}: straightness {flow.straightness.sum():.3f}", fontsize=9)
    ax.set_aspect("equal")
    ax.tick_params(labelsize=7)
  fig.suptitle(f"Exact {num_stages}-stage piecewise flow, noise to 8 points (colour: stage, "
               "coarsest blue)", fontsize=9)
  fig.tight_layout()
  out_dir = os.path.join(output, "results")
  os.makedirs(out_dir, exist_ok=True)
  fig.savefig(os.path.join(out_dir, "coupling_toy.png"), dpi=110)
  plt.close(fig)
  windows = coupling.contiguous_windows(num_stages)[::-1]
  head = ["endpoint noise"] + [f"stage {num_stages - 1 - i} [{s:.2f}, {e:.2f}]: S / 1-step error"
                               for i, (s, e) in enumerate(windows)] + ["S total"]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for name, flow in flows.items():
    cells = [f"{a:.4f} / {b:.3f}" for a, b in zip(flow.straightness, flow.one_step_error)]
    lines.append("| " + " | ".join([name] + cells + [f"{flow.straightness.sum():.4f}"]) + " |")
  text = "\n".join(lines) + "\n"
  with open(os.path.join(out_dir, "coupling_toy.md"), "w") as f:
    f.write(text)
  return text


def arm_order(config: str, sweep_name: str) -> list[str] | None:
  """The arms of sweep ``sweep_name`` of a sweep config file (``launch.sweep``'s ``sweep(arg)``,
  or its ``EVALUATIONS`` table of sampling ablations), in the config's order; None if it has
  no such sweep."""
  from launch import sweep as sweep_lib  # only when asked: the launcher is not part of pfm

  module = sweep_lib.load_config_module(config)
  names = None
  if sweep_name in getattr(module, "EVALUATIONS", {}):
    names = [run[0] for run in module.EVALUATIONS[sweep_name]]
  else:
    try:
      names = [run.name for run in sweep_lib.expand(f"{config}:{sweep_name}")]
    except (ValueError, KeyError):
      return None
  return list(dict.fromkeys(arm_and_seed(n)[0] for n in names))


def main(argv):
  del argv
  for name in sorted(os.listdir(FLAGS.runs)):
    folder = os.path.join(FLAGS.runs, name)
    if not os.path.isdir(folder):
      continue
    order = arm_order(FLAGS.config, name) if FLAGS.config else None
    if (text := write_sweep(folder, FLAGS.output, order)) is not None:
      print(f"## {name}\n\n{text}")
  print(f"## coupling_toy\n\n{write_coupling_toy(FLAGS.output)}")


if __name__ == "__main__":
  flags.DEFINE_string("runs", None, "A folder of sweeps (each a folder of pfm.train workdirs).")
  flags.DEFINE_string("output", "docs", "Where results/SWEEP.png and .md are written.")
  flags.DEFINE_string("config", None, "A sweep config (configs/digits.py) whose sweeps give the "
                      "arms' order; the first arm is each table's reference.")
  flags.mark_flags_as_required(["runs"])
  app.run(main)
