"""Launchers: sweep expansion and override round trips, the local multi-process launcher, scripts.

Nothing here trains: the local launcher runs tiny ``python -c`` programs and sweeps run a stand-in
for ``pfm.train`` that parses its flags exactly as ``pfm.train`` does (ml_collections'
``config_flags``) and records the typed values.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time

import pytest
from absl import flags
from ml_collections import config_flags

from launch import local, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "configs", "default.py")


def _parse_config(argv: list[str]):
  """The config ``pfm.train`` would get from ``argv`` (``--config=...`` + overrides)."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=["prog", *argv])
  fv(["prog", *argv])
  return fv.config


def _get(config, key):
  for part in key.split("."):
    config = config[part]
  return config


def _assert_same_typed(actual, expected, key):
  assert type(actual) is type(expected) or (type(expected) is int and type(actual) is float), (
      key, actual, expected)
  if isinstance(expected, (tuple, list)):
    assert tuple(actual) == tuple(expected), key
    for a, e in zip(actual, expected):
      _assert_same_typed(a, e, key)
  else:
    assert actual == expected, (key, actual, expected)


# A config with a field of every overridable kind, and a sweep over awkward values.
_TYPES_CONFIG = '''
import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.opt = ml_collections.ConfigDict()
  c.opt.lr = 1e-3
  c.opt.steps = 10
  c.opt.flag = False
  c.name = "x"
  c.weights = (1.0, 2.0, 1.0)
  c.names = ("a",)
  c.gamma = config_dict.placeholder(float)
  return c


def sweep(arg=None):
  return [
      {"opt.lr": 1e-4, "opt.steps": 3, "opt.flag": True, "name": ""},
      {"opt.lr": 2, "opt.flag": False, "name": "a b,c=(d)/e", "weights": (0.5, 1e-05, 3.0)},
      {"weights": (7.0,), "names": ("p q", "r,s"), "gamma": -0.25, "name": "1e-3"},
      {"name": "True", "names": ()},
  ]
'''


@pytest.fixture
def types_config(tmp_path):
  path = tmp_path / "types_config.py"
  path.write_text(_TYPES_CONFIG)
  return str(path)


def test_default_sweep_expands_to_unique_safe_names():
  runs = sweep.expand(f"{DEFAULT}")
  assert len(runs) == 6
  names = [r.name for r in runs]
  assert len(set(names)) == len(names)
  for run in runs:
    assert re.fullmatch(r"[A-Za-z0-9._,=+-]+", run.name), run.name
    assert set(run.overrides) == {"optimizer.learning_rate", "pyramid.partition"}
  lr = sweep.load_config_module(DEFAULT).get_config().optimizer.learning_rate
  assert f"optimizer.learning_rate={lr!r},pyramid.partition=2-1-1" in names
  assert f"optimizer.learning_rate={lr!r},pyramid.partition=empty" in names
  assert {r.overrides["pyramid.partition"] for r in runs} == {"", "2-1-1"}
  smoke = sweep.expand(f"{DEFAULT}:smoke")
  assert len(smoke) == 2 and len({r.name for r in smoke}) == 2


@pytest.mark.parametrize("arg", ["", ":smoke"])
def test_default_sweep_round_trips_through_config_flags(arg):
  """Every run's flags give pfm.train the override values with the field's types."""
  config = f"{DEFAULT}{arg}"
  for run in sweep.expand(config):
    parsed = _parse_config([f"--config={config}", *sweep.override_flags(run.overrides)])
    for key, value in run.overrides.items():
      _assert_same_typed(_get(parsed, key), value, key)


def test_default_sweep_configs_are_valid():
  from pfm import validation

  for config in (DEFAULT, f"{DEFAULT}:smoke"):
    for run in sweep.expand(config):
      parsed = _parse_config([f"--config={config}", *sweep.override_flags(run.overrides)])
      validation.validate(parsed)


DIGITS = "configs/digits.py"


@pytest.mark.parametrize("ablation", ["fig7", "table2", "pfm"])
def test_digit_ablations_are_named_valid_runs(ablation):
  """Each ablation's runs have their given names and distinct overrides, parse back through
  config_flags with the fields' types, and pass validation."""
  from pfm import validation

  config = f"{DIGITS}:{ablation}"
  runs = sweep.expand(config)
  names = [r.name for r in runs]
  assert len(set(names)) == len(runs) >= 3 and all(",seed=" in n for n in names)
  for run in runs:
    parsed = _parse_config([f"--config={config}", *sweep.override_flags(run.overrides)])
    for key, value in run.overrides.items():
      _assert_same_typed(_get(parsed, key), value, key)
    spec = validation.validate(parsed)
    assert spec.config.data.dataset == "moving_digits"
    assert spec.num_stages == run.overrides["pyramid.num_stages"]
  if ablation == "fig7":
    assert names == ["full,seed=0", "full,seed=1", "spatial,seed=0", "spatial,seed=1"]


def test_named_sweep_entries(tmp_path):
  path = tmp_path / "named.py"
  path.write_text(
      "import ml_collections\n"
      "def get_config(arg=None):\n"
      "  c = ml_collections.ConfigDict(); c.seed = 0; return c\n"
      "def sweep(arg=None):\n"
      "  return [('a b/c', {'seed': 1}), {'seed': 2}]\n")
  runs = sweep.expand(str(path))
  assert [r.name for r in runs] == ["a_b_c", "seed=2"]
  path.write_text(path.read_text().replace("('a b/c'", "(' '"))
  with pytest.raises(ValueError, match="empty run name"):
    sweep.expand(str(path))
  with pytest.raises(ValueError, match="one of"):
    sweep.expand(DIGITS)


def test_every_value_kind_round_trips(types_config):
  runs = sweep.expand(types_config)
  assert len({r.name for r in runs}) == len(runs)
  for run in runs:
    assert re.fullmatch(r"[A-Za-z0-9._,=+-]+", run.name), run.name
    parsed = _parse_config([f"--config={types_config}", *sweep.override_flags(run.overrides)])
    for key, value in run.overrides.items():
      _assert_same_typed(_get(parsed, key), value, key)


def test_render_value():
  assert sweep.render_value(1e-4) == "0.0001"
  assert sweep.render_value(True) == "true"
  assert sweep.render_value(3) == "3"
  assert sweep.render_value("") == ""
  assert sweep.render_value((1.0, 2.0, 1.0)) == "(1.0,2.0,1.0)"
  assert sweep.render_value((1.0,)) == "(1.0,)"
  with pytest.raises(TypeError):
    sweep.render_value(None)


@pytest.mark.parametrize("bad, message", [
    ({"opt.nope": 1.0}, "not a config field"),
    ({"opt.steps": 2.5}, "the field is a int"),
    ({"opt.flag": 1}, "the field is a bool"),
    ({"name": 3}, "the field is a str"),
    ({"weights": 1.0}, "the field is a tuple"),
])
def test_bad_overrides_are_rejected_before_anything_runs(tmp_path, bad, message):
  path = tmp_path / "bad_config.py"
  path.write_text(_TYPES_CONFIG + f"\n\ndef sweep(arg=None):\n  return [{bad!r}]\n")
  with pytest.raises(ValueError, match=message):
    sweep.expand(str(path))


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
  """Runs ``command`` to completion (60 s at most) with its output captured as text."""
  return subprocess.run(command, check=False, capture_output=True, text=True, timeout=60,
                        **kwargs)


def _run_sweep(*args):
  return _run([sys.executable, "-m", "launch.sweep", *args], cwd=ROOT)


def test_dry_run_prints_one_command_per_run(tmp_path):
  workdir = str(tmp_path / "sweep")
  out = _run_sweep("--config=configs/default.py:smoke", f"--workdir={workdir}", "--dry_run",
                   "--", "--config.train.num_steps=3")
  assert out.returncode == 0, out.stderr
  commands = [shlex.split(line) for line in out.stdout.splitlines()]
  runs = sweep.expand(f"{DEFAULT}:smoke")
  assert len(commands) == len(runs)
  for cmd, run in zip(commands, runs):
    assert cmd[:4] == ["python", "-m", "pfm.train", "--config=configs/default.py:smoke"]
    assert cmd[-2:] == [f"--workdir={workdir}/{run.name}", "--config.train.num_steps=3"]
    assert cmd[4:-2] == sweep.override_flags(run.overrides)
  assert not os.path.exists(workdir)

  out = _run_sweep("--config=configs/default.py:smoke", "--workdir=gs://bucket/s/", "--dry_run",
                   "--launcher=slurm")
  first = shlex.split(out.stdout.splitlines()[0])
  assert first[:3] == ["sbatch", f"--job-name={runs[0].name}", "launch/slurm.sbatch"]
  assert first[-1] == f"--workdir=gs://bucket/s/{runs[0].name}"


# Stands in for `python -m pfm.train`: parses the flags as pfm.train does, records the typed
# overrides in the workdir, and fails for one learning rate.
_FAKE_TRAIN = '''
import json, os, sys
from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "config")
flags.DEFINE_string("workdir", None, "workdir")


def main(argv):
  c = flags.FLAGS.config
  os.makedirs(flags.FLAGS.workdir, exist_ok=True)
  with open(os.path.join(flags.FLAGS.workdir, "values.json"), "w") as f:
    json.dump({"lr": c.opt.lr, "steps": c.opt.steps, "weights": list(c.weights),
               "types": [type(c.opt.lr).__name__, type(c.opt.steps).__name__]}, f)
  if c.opt.lr == 2.0:
    sys.exit(3)


app.run(main)
'''


def test_sweep_runs_every_run_and_reports_failures(tmp_path, types_config):
  (tmp_path / "fake_train.py").write_text(_FAKE_TRAIN)
  fake_python = tmp_path / "fake_python"  # called as: fake_python -m pfm.train FLAGS...
  fake_python.write_text(f"#!/bin/sh\nshift 2\nexec {shlex.quote(sys.executable)} "
                         f"{shlex.quote(str(tmp_path / 'fake_train.py'))} \"$@\"\n")
  fake_python.chmod(0o755)
  workdir = tmp_path / "runs"
  out = _run_sweep(f"--config={types_config}", f"--workdir={workdir}",
                   f"--python={fake_python}", "--", "--config.opt.steps=7")
  assert out.returncode == 1, out.stdout + out.stderr
  runs = sweep.expand(types_config)
  assert "3/4 runs succeeded" in out.stdout
  assert re.search(r"FAILED \(exit 3\): " + re.escape(runs[1].name), out.stdout)
  for run in runs:  # the run after the failing one ran too
    values = json.loads((workdir / run.name / "values.json").read_text())
    assert values["steps"] == 7 and values["types"] == ["float", "int"]
  assert json.loads((workdir / runs[1].name / "values.json").read_text())["weights"] == [
      0.5, 1e-05, 3.0]


_PRINT_ENV = ("import json, os; print(json.dumps({k: v for k, v in os.environ.items() "
              "if k.startswith(('JAX_', 'PFM_TEST_'))}))")


def test_launch_sets_the_distributed_environment():
  unset = dict.fromkeys(("JAX_PLATFORMS", "JAX_COMPILATION_CACHE_DIR",  # the latter two: conftest
                         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"))
  result = local.launch([sys.executable, "-c", _PRINT_ENV], num_processes=3,
                        devices_per_process=2, env={"PFM_TEST_X": "1", **unset},
                        echo=False, timeout=60)
  assert result.ok and result.returncode == 0 and result.returncodes == [0, 0, 0]
  envs = [json.loads(out) for out in result.outputs]
  address = envs[0]["JAX_COORDINATOR_ADDRESS"]
  assert re.fullmatch(r"127\.0\.0\.1:\d+", address)
  for i, env in enumerate(envs):
    assert env == {"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "3",
                   "JAX_PROCESS_ID": str(i), "JAX_NUM_CPU_DEVICES": "2", "PFM_TEST_X": "1"}


def test_cli_prefixes_output_and_writes_logs(tmp_path):
  code = ("import os, sys; i = os.environ['JAX_PROCESS_ID']; print('hello', i); "
          "print('warn', i, file=sys.stderr)")
  out = _run([sys.executable, "-m", "launch.local", "--num_processes=2", f"--log_dir={tmp_path}",
              "--", sys.executable, "-c", code], cwd=ROOT)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  for i in range(2):
    assert f"[p{i}] hello {i}" in lines and f"[p{i}] warn {i}" in lines
    log = (tmp_path / f"process_{i}.log").read_text().splitlines()
    assert sorted(log) == sorted([f"hello {i}", f"warn {i}"])


# Process 1 fails after start-up; the others would sleep for a minute, process 0 in a child of
# its own (whose pid it prints) to check that stopping reaches a process's children too.
_FAIL_ONE = """
import os, subprocess, sys, time
i = int(os.environ["JAX_PROCESS_ID"])
if i == 0:
  child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  print("child", child.pid, flush=True)
print("up", i, flush=True)
if i == 1:
  time.sleep(1.0)
  sys.exit(3)
time.sleep(60)
"""


def _gone(pid: int, wait: float = 5.0) -> bool:
  deadline = time.monotonic() + wait
  while time.monotonic() < deadline:
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return True
    time.sleep(0.05)
  return False


def test_a_failing_process_stops_the_others():
  start = time.monotonic()
  result = local.launch([sys.executable, "-c", _FAIL_ONE], num_processes=3, echo=False,
                        timeout=60, grace_period=5)
  assert time.monotonic() - start < 20
  assert not result.ok and result.failed_process == 1 and not result.timed_out
  assert result.returncodes[1] == 3 and result.returncode == 3
  assert result.returncodes[0] < 0 and result.returncodes[2] < 0  # stopped by a signal
  assert "up 2" in result.outputs[2]
  child = int(re.search(r"child (\d+)", result.outputs[0]).group(1))
  assert _gone(child)
  with pytest.raises(RuntimeError, match="process 1 exited with 3"):
    result.check()


def test_cli_exits_with_the_failing_return_code():
  start = time.monotonic()
  code = ("import os, sys, time; i = int(os.environ['JAX_PROCESS_ID']); "
          "sys.exit(5) if i == 0 else time.sleep(60)")
  out = _run([sys.executable, "-m", "launch.local", "--num_processes=2", "--", sys.executable,
              "-c", code], cwd=ROOT)
  assert out.returncode == 5 and time.monotonic() - start < 20
  assert "process 0 exited with 5" in out.stderr


def test_timeout_stops_everything():
  result = local.launch([sys.executable, "-c", "import time; time.sleep(60)"], num_processes=2,
                        echo=False, timeout=1.0, grace_period=5)
  assert result.timed_out and result.returncode == 124 and result.failed_process is None
  assert all(rc < 0 for rc in result.returncodes)


@pytest.mark.parametrize("script", ["tpu_pod.sh", "slurm.sbatch"])
def test_shell_scripts_parse(script):
  path = os.path.join(ROOT, "launch", script)
  subprocess.run(["bash", "-n", path], check=True, timeout=30)
  usage = _run(["bash", path, "--help"])
  assert "launch/" in usage.stdout + usage.stderr


def test_slurm_script_calls_srun_with_the_train_flags(tmp_path):
  """With a stand-in srun on PATH, the batch script runs ``srun ... python -m pfm.train FLAGS``."""
  srun = tmp_path / "srun"
  srun.write_text('#!/bin/sh\nfor a in "$@"; do echo "ARG $a"; done\n')
  srun.chmod(0o755)
  env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}",
         "SLURM_SUBMIT_DIR": ROOT, "SLURM_CPUS_PER_TASK": "4"}
  out = _run(["bash", os.path.join(ROOT, "launch", "slurm.sbatch"), "--config=configs/default.py",
              "--workdir=/shared/a b"], env=env, cwd=str(tmp_path))
  assert out.returncode == 0, out.stderr
  args = [line[4:] for line in out.stdout.splitlines() if line.startswith("ARG ")]
  assert args == ["--kill-on-bad-exit=1", "--label", "--cpus-per-task=4", "python", "-m",
                  "pfm.train", "--config=configs/default.py", "--workdir=/shared/a b"]


def test_tpu_script_runs_the_same_command_on_all_workers(tmp_path):
  """With a stand-in gcloud on PATH, ``train`` sends one ssh --worker=all whose command, run by
  bash, starts pfm.train with the flags unchanged."""
  gcloud = tmp_path / "gcloud"
  gcloud.write_text(textwrap.dedent("""\
      #!/bin/bash
      for a in "$@"; do echo "GCLOUD $a"; case "$a" in --command=*) cmd="${a#--command=}";; esac
      done
      cd "$HOME" && eval "$cmd"
      """))
  gcloud.chmod(0o755)
  home = tmp_path / "home"
  (home / "pfm").mkdir(parents=True)
  (home / "pfm-venv" / "bin").mkdir(parents=True)
  python = home / "pfm-venv" / "bin" / "python"
  python.write_text('#!/bin/sh\necho "CWD $(pwd)"\nfor a in "$@"; do echo "ARG $a"; done\n')
  python.chmod(0o755)
  env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}",
         "HOME": str(home), "TPU_NAME": "my-tpu", "ZONE": "us-central2-b"}
  flags_ = ["--config=configs/default.py:smoke", "--config.pyramid.partition=",
            "--config.pyramid.stage_weights=(1.0,2.0,1.0)", "--workdir=gs://b/it's a run"]
  out = _run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "train", *flags_], env=env)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert "GCLOUD --worker=all" in lines and "GCLOUD --zone=us-central2-b" in lines
  assert f"CWD {home / 'pfm'}" in lines
  assert [line[4:] for line in lines if line.startswith("ARG ")] == ["-m", "pfm.train", *flags_]
  assert (home / "pfm-train.log").read_text().startswith("CWD ")
