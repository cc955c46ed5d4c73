"""The notebooks run top to bottom as a user runs them (``nbclient``, a real IPython kernel)."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient

from configs import digits
from pfm import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_notebook(name: str, cwd: str, monkeypatch, **env) -> nbformat.NotebookNode:
  """Executes ``notebooks/NAME`` in ``cwd`` (not the checkout: no path tricks) with ``env``."""
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  notebook = nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)
  NotebookClient(notebook, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": cwd}}).execute()  # raises on a failing cell
  return notebook


def outputs(notebook, kind: str) -> list:
  return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
          if kind in o.get("data", {})]


def test_quickstart_trains_samples_and_shows_the_video(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  notebook = run_notebook("quickstart.ipynb", str(tmp_path), monkeypatch,
                          PFM_WORKDIR=str(workdir))
  assert (workdir / "quickstart.mp4").stat().st_size > 1000
  assert any("<video" in o["data"]["text/html"] for o in outputs(notebook, "text/html"))
  assert outputs(notebook, "image/png")  # the frame strip


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory):
  """Two Moving Digits smoke runs, full resolution and spatial pyramid, as one sweep."""
  root = tmp_path_factory.mktemp("runs")
  for arm, overrides in (("full", digits.FULL), ("spatial", digits.SPATIAL)):
    config = digits.get_config("smoke")
    config.update_from_flattened_dict(dict(overrides))
    config.model.patch_size = 4  # the smoke clips' 16x16 frames tile 3 stages at patch 4
    train.train_and_evaluate(config, str(root / "fig7" / f"{arm},seed=0"))
  return root


def test_results_notebook_draws_every_sweep(smoke_sweep, tmp_path, monkeypatch):
  notebook = run_notebook("results.ipynb", str(tmp_path), monkeypatch, PFM_RUNS=str(smoke_sweep))
  tables = [o["data"]["text/markdown"] for o in outputs(notebook, "text/markdown")]
  assert any("| full | 1 | 6 |" in t and "| spatial | 1 | 6 |" in t for t in tables)
  assert len(outputs(notebook, "image/png")) == 2  # fig7 and the coupling toy
