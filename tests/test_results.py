"""Ablation results from metric-writer logs (``pfm/results.py``)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from clu import metric_writers

from pfm import results

DIGITS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "digits.py")


def _write_run(path, scores, pflop_per_step, log_every=50, sample_every=100, steps=300):
  writer = metric_writers.create_default_writer(str(path), asynchronous=False)
  for step in range(log_every, steps + 1, log_every):
    writer.write_scalars(step, {"compute/train_pflop": pflop_per_step * step,
                                "compute/train_seconds": 0.5 * step, "loss": 1.0 / step})
    if step % sample_every == 0:
      writer.write_scalars(step, {f"eval/{k}": v(step) for k, v in scores.items()})
  writer.flush()
  writer.close()


@pytest.fixture
def sweep_folder(tmp_path):
  fd = lambda rate: (lambda step: 1000.0 / (1 + rate * step))
  for seed, jitter in ((0, 0.0), (1, 0.1)):
    _write_run(tmp_path / f"full,seed={seed}", {"frechet_distance": fd(0.01 + jitter * 0.01),
                                                "direction_accuracy": lambda s: s / 300},
               pflop_per_step=1.0)
    _write_run(tmp_path / f"spatial,seed={seed}", {"frechet_distance": fd(0.03 + jitter * 0.01),
                                                   "direction_accuracy": lambda s: s / 200},
               pflop_per_step=1.2)
  (tmp_path / "not_a_run").mkdir()
  return tmp_path


def test_curves_take_scores_and_compute_at_the_sample_steps(sweep_folder):
  arms = results.load_sweep(str(sweep_folder))
  assert list(arms) == ["full", "spatial"] and set(arms["full"]) == {0, 1}
  c = arms["spatial"][0]
  np.testing.assert_array_equal(c.steps, [100, 200, 300])
  np.testing.assert_allclose(c.compute["compute/train_pflop"], [120, 240, 360])
  np.testing.assert_allclose(c.scores["eval/frechet_distance"], 1000 / (1 + 0.03 * c.steps))


def test_compute_to_reach_interpolates_and_table_reports_it(sweep_folder, tmp_path):
  xs, ys = np.array([0.0, 10.0, 20.0]), np.array([9.0, 5.0, 1.0])
  assert results.compute_to_reach(xs, ys, 3.0, "lower") == pytest.approx(15.0)
  assert np.isnan(results.compute_to_reach(xs, ys, 0.5, "lower"))
  assert results.compute_to_reach(xs, -ys, -3.0, "higher") == pytest.approx(15.0)
  text = results.write_sweep(str(sweep_folder), str(tmp_path / "out"))
  assert (tmp_path / "out" / "results" / f"{sweep_folder.name}.png").stat().st_size > 10_000
  rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()}
  assert "| full | 2 | 300 | 300 ± 0 |" in text
  # full's final FD (mean of its seeds) is reached by spatial earlier, at interpolated compute.
  final = np.mean([1000 / (1 + r * 300) for r in (0.01, 0.011)])
  fd = lambda rate, step: 1000 / (1 + rate * step)
  xs = 1.2 * np.array([100, 200, 300])
  ys = np.mean([[fd(r, s) for s in (100, 200, 300)] for r in (0.03, 0.031)], axis=0)
  expected = results.compute_to_reach(xs, ys, final, "lower")
  assert expected < 1.2 * 300 and f"{expected:.3g}" in text.split("Compute")[1]
  assert rows["spatial"]


def test_evaluation_sweeps_table_their_metrics_files(tmp_path):
  """A sweep of pfm.evaluate results (no training logs): a table per arm in the config's order."""
  import json
  for arm, fd in (("renoise", (200.0, 220.0)), ("no_renoise", (400.0, 380.0))):
    for seed, value in enumerate(fd):
      run = tmp_path / "fig10" / f"{arm},seed={seed}"
      run.mkdir(parents=True)
      (run / "metrics.json").write_text(json.dumps(
          {"frechet_distance": value, "prompt_accuracy": 0.5, "swd": {"avg": 40.0}}))
  order = results.arm_order(DIGITS, "fig10")
  assert order == ["renoise", "no_renoise"]
  text = results.write_sweep(str(tmp_path / "fig10"), str(tmp_path / "out"), order)
  lines = text.splitlines()
  assert lines[2].startswith("| renoise | 2 | 210 ± 10 |")
  assert lines[3].startswith("| no_renoise | 2 | 390 ± 10 |")
  assert (tmp_path / "out" / "results" / "fig10.png").stat().st_size > 5_000
  # A training sweep's order comes from the config's sweep(arg).
  assert results.arm_order(DIGITS, "table2")[0] == "temporal"
  assert results.arm_order(DIGITS, "not_a_sweep") is None


def test_coupling_toy_figure_and_table(tmp_path):
  text = results.write_coupling_toy(str(tmp_path))
  rows = [line for line in text.splitlines() if line.startswith("| coupled") or
          line.startswith("| independent")]
  total = {r.split(" | ")[0].strip("| "): float(r.rstrip(" |").split(" | ")[-1]) for r in rows}
  assert total["coupled"] < total["independent"]
  assert (tmp_path / "results" / "coupling_toy.png").stat().st_size > 20_000
