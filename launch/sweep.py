r"""Config sweeps: one ``pfm.train`` run per set of overrides from the config's ``sweep()``.

    python -m launch.sweep --config=configs/default.py:smoke --workdir=runs/sweep --dry_run
    python -m launch.sweep --config=configs/default.py --workdir=runs/sweep -- \
        --config.train.num_steps=1000

A config module may define, next to ``get_config(arg)``,

    def sweep(arg: str | None) -> list[dict[str, Any]]

returning flat override dicts such as ``{"optimizer.learning_rate": 1e-4,
"pyramid.partition": "2-1-1"}``, or ``(run_name, overrides)`` pairs that name their runs;
``arg`` is the part of ``--config`` after the colon, as for ``get_config``. Each dict becomes

    python -m pfm.train --config=FILE:ARG --config.KEY=VALUE ... --workdir=WORKDIR/RUN_NAME [EXTRA]

where RUN_NAME is the given name or lists the overrides
(``optimizer.learning_rate=0.0001,pyramid.partition=2-1-1``), in filesystem-safe characters, so ``tensorboard --logdir WORKDIR`` shows one curve per run.
Values are written as ml_collections' ``config_flags`` parses them back for the field's type
(floats and ints as Python literals, bools as true/false, strings verbatim, tuples as
``(1.0,2.0,1.0)``), and every key and value type is checked against ``get_config(ARG)`` before
anything starts.

Runs go one after another here (``--launcher=local``), continuing past failures, with a summary
and a non-zero exit if any failed; ``--launcher=slurm`` submits each run with
``sbatch launch/slurm.sbatch`` and ``--launcher=tpu`` runs each with ``launch/tpu_pod.sh train``.
``--dry_run`` only prints the commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

LAUNCHERS = ("local", "slurm", "tpu")
_MAX_NAME = 200  # bytes; most filesystems allow 255 per path component
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+-]")


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep: its directory name under the sweep's workdir and its overrides."""

  name: str
  overrides: dict[str, Any]


def split_config_arg(config: str) -> tuple[str, str | None]:
  """``"configs/default.py:smoke"`` -> ``("configs/default.py", "smoke")`` (as ``config_flags``:
  everything after the first colon is the ``get_config`` argument)."""
  path, sep, arg = config.partition(":")
  return path, (arg if sep else None)


def load_config_module(path: str):
  """Imports a config file by path, as ``config_flags`` does, without registering the module."""
  spec = importlib.util.spec_from_file_location("sweep_config_module", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"cannot load config file {path!r}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _literal(value: Any) -> str:
  """A Python literal that ``ast.literal_eval`` reads back as ``value`` (no spaces)."""
  if isinstance(value, (tuple, list)):
    items = ",".join(_literal(v) for v in value)
    if isinstance(value, list):
      return f"[{items}]"
    return f"({items},)" if len(value) == 1 else f"({items})"
  if value is None or isinstance(value, (bool, int, float, str)):
    return repr(value)
  raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as a command-line literal")


def render_value(value: Any) -> str:
  """The text after ``--config.KEY=`` that ``config_flags`` parses back to ``value``.

  ``config_flags`` picks the parser by the field's type: absl's boolean parser (true/false),
  integer and float parsers (``int(text)``, ``float(text)``), the string parser (the text
  itself, so strings stay unquoted; "" is an empty value), and for tuples ``ast.literal_eval``.

  Raises:
    TypeError: for None (no typed parser reads it) or types without a literal form.
  """
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (int, float)):
    return repr(value)
  if isinstance(value, str):
    return value
  if isinstance(value, (tuple, list)):
    return _literal(tuple(value) if isinstance(value, tuple) else value)
  raise TypeError(f"cannot pass {value!r} ({type(value).__name__}) on the command line; "
                  "sweep values must be bool, int, float, str or tuples of literals")


def override_flags(overrides: Mapping[str, Any]) -> list[str]:
  """``{"a.b": 1e-4}`` -> ``["--config.a.b=0.0001"]``."""
  return [f"--config.{key}={render_value(value)}" for key, value in overrides.items()]


def _name_value(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (tuple, list)):
    return "-".join(_name_value(v) for v in value)
  if isinstance(value, str):
    return value or "empty"
  return repr(value)


def run_name(overrides: Mapping[str, Any]) -> str:
  """``key=value`` pairs joined by commas, outside ``[A-Za-z0-9._,=+-]`` replaced by ``_``.

  Tuples are joined by ``-`` and "" is written ``empty``; a name longer than 200 bytes is cut and
  ends in a hash of the full name. No overrides at all gives ``default``.
  """
  if not overrides:
    return "default"
  name = _UNSAFE.sub("_", ",".join(f"{k}={_name_value(v)}" for k, v in overrides.items()))
  if len(name) > _MAX_NAME:
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    name = f"{name[:_MAX_NAME - 11]}_{digest}"
  return name


def _check_types(config, overrides: Mapping[str, Any], where: str):
  """Raises if a key is not a field of ``config`` or its value would parse to another type."""
  from ml_collections.config_flags import config_path

  for key, value in overrides.items():
    try:
      field_type = config_path.get_type(key, config)
    except (KeyError, AttributeError, IndexError, ValueError) as e:
      raise ValueError(f"{where}: {key!r} is not a config field ({e})") from None
    render_value(value)  # raises for values with no command-line form
    if field_type is float:
      ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif field_type is int:
      ok = isinstance(value, int) and not isinstance(value, bool)
    elif field_type in (bool, str):
      ok = isinstance(value, field_type)
    elif field_type is tuple:
      ok = isinstance(value, (tuple, list))
    else:
      ok = True  # fields parsed as literals (ml_collections' ``object`` parser)
    if not ok:
      raise ValueError(f"{where}: {key}={value!r} is a {type(value).__name__}, but the field is "
                       f"a {getattr(field_type, '__name__', field_type)}")


def expand(config: str) -> list[Run]:
  """The runs of ``--config=FILE[:ARG]``: ``FILE``'s ``sweep(ARG)``, checked and named.

  Raises:
    ValueError: if the file has no ``sweep`` or it returns no runs, an override names no config
      field or has a value of the wrong type, or two runs are identical.
    TypeError: if a run is not a dict, or a value has no command-line form.
  """
  path, arg = split_config_arg(config)
  module = load_config_module(path)
  sweep_fn = getattr(module, "sweep", None)
  if sweep_fn is None:
    raise ValueError(f"{path} defines no sweep(arg) function")
  entries = sweep_fn(arg)
  if not entries:
    raise ValueError(f"{path}: sweep({arg!r}) returned no runs")
  base = module.get_config(arg) if arg is not None else module.get_config()
  runs: list[Run] = []
  for i, entry in enumerate(entries):
    given_name = None
    if (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)
        and isinstance(entry[1], Mapping)):
      given_name, overrides = entry
    else:
      overrides = entry
    if not isinstance(overrides, Mapping):
      raise TypeError(f"{path}: sweep({arg!r})[{i}] is a {type(overrides).__name__}, "
                       "not a dict of overrides or a (name, overrides) pair")
    overrides = dict(overrides)
    _check_types(base, overrides, f"{path}: sweep({arg!r})[{i}]")
    if any(r.overrides == overrides for r in runs):
      raise ValueError(f"{path}: sweep({arg!r}) lists {overrides} twice")
    if given_name is not None and not given_name.strip():
      raise ValueError(f"{path}: sweep({arg!r})[{i}] has an empty run name")
    name = base_name = (run_name(overrides) if given_name is None
                        else _UNSAFE.sub("_", given_name)[:_MAX_NAME])
    suffix = 2
    while any(r.name == name for r in runs):  # distinct overrides, same name after sanitising
      name, suffix = f"{base_name}_{suffix}", suffix + 1
    runs.append(Run(name, overrides))
  return runs


def run_workdir(workdir: str, run: Run) -> str:
  """``WORKDIR/RUN_NAME``, joined with "/" so that ``gs://`` workdirs work too."""
  return f"{workdir.rstrip('/')}/{run.name}"


def command(run: Run, config: str, workdir: str, extra_args: Sequence[str] = (),
            launcher: str = "local", python: str = "python") -> list[str]:
  """The argv that trains ``run`` with ``launcher`` (see the module docstring)."""
  train_args = [f"--config={config}", *override_flags(run.overrides),
                f"--workdir={run_workdir(workdir, run)}", *extra_args]
  if launcher == "local":
    return [python, "-m", "pfm.train", *train_args]
  if launcher == "slurm":
    return ["sbatch", f"--job-name={run.name}", "launch/slurm.sbatch", *train_args]
  if launcher == "tpu":
    return ["launch/tpu_pod.sh", "train", *train_args]
  raise ValueError(f"unknown launcher {launcher!r}; use one of {LAUNCHERS}")


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m launch.sweep",
      description="Train one run per override set of a config's sweep(arg).",
      usage="%(prog)s --config=FILE[:ARG] --workdir=DIR [--dry_run] "
            "[--launcher={local,slurm,tpu}] [-- EXTRA_TRAIN_FLAGS ...]")
  parser.add_argument("--config", required=True, help="config file, optionally with :ARG")
  parser.add_argument("--workdir", required=True,
                      help="sweep directory; run R trains in WORKDIR/R (a gs:// path works)")
  parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  parser.add_argument("--launcher", choices=LAUNCHERS, default="local",
                      help="local: run here one after another; slurm: sbatch each run; "
                           "tpu: launch/tpu_pod.sh train, one after another")
  parser.add_argument("--python", default="python",
                      help="interpreter of local runs (default: python from PATH)")
  parser.add_argument("extra", nargs=argparse.REMAINDER,
                      help="after --: flags appended to every pfm.train command")
  args = parser.parse_args(argv)
  if args.extra[:1] == ["--"]:
    args.extra = args.extra[1:]
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  try:
    runs = expand(args.config)
  except (ValueError, TypeError, FileNotFoundError) as e:
    print(f"launch.sweep: {e}", file=sys.stderr)
    return 2
  commands = [command(r, args.config, args.workdir, args.extra, args.launcher, args.python)
              for r in runs]
  if args.dry_run:
    for cmd in commands:
      print(shlex.join(cmd))
    return 0
  failed: list[tuple[Run, int]] = []
  for i, (run, cmd) in enumerate(zip(runs, commands)):
    print(f"launch.sweep: [{i + 1}/{len(runs)}] {run.name}\n  {shlex.join(cmd)}", flush=True)
    try:
      rc = subprocess.run(cmd, check=False).returncode
    except OSError as e:  # e.g. sbatch or the interpreter not found
      print(f"launch.sweep: {e}", file=sys.stderr)
      rc = 127
    except KeyboardInterrupt:
      print(f"launch.sweep: interrupted during {run.name}; {len(runs) - i - 1} runs not started",
            file=sys.stderr)
      return 130
    if rc:
      failed.append((run, rc))
      print(f"launch.sweep: {run.name} failed with exit status {rc}; continuing", flush=True)
  verb = "submitted" if args.launcher == "slurm" else "succeeded"
  print(f"launch.sweep: {len(runs) - len(failed)}/{len(runs)} runs {verb} in {args.workdir}")
  for run, rc in failed:
    print(f"  FAILED (exit {rc}): {run.name}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
