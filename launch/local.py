r"""Local multi-process launcher: N copies of one command joined by ``jax.distributed``.

    python -m launch.local --num_processes=2 --devices_per_process=2 -- \
        python -m pfm.train --config=configs/default.py:smoke --workdir=/tmp/mh

Multi-host code paths (process 0 logging, collective checkpoints, per-process data shards,
cross-process collectives) can then be exercised on one machine, CPU only. Each process gets

  JAX_COORDINATOR_ADDRESS  127.0.0.1:PORT, a free loopback port (process 0 hosts the coordinator)
  JAX_NUM_PROCESSES        N
  JAX_PROCESS_ID           0 .. N-1
  JAX_NUM_CPU_DEVICES      devices per process on the CPU backend

on top of this environment. Every output line is echoed prefixed with ``[p{i}] `` (stdout and
stderr merged) and, with ``--log_dir``, also written unprefixed to ``LOG_DIR/process_{i}.log``.
If a process exits non-zero the others are stopped (SIGTERM, then SIGKILL after a grace period:
a peer left waiting in a collective would otherwise hang until the coordinator's heartbeat
timeout) and the launcher exits with the failing process's return code (128 + signal for a
process killed by a signal, 124 on ``--timeout``).

From Python: ``launch.local.launch(command, num_processes, devices_per_process)`` returns a
``LaunchResult`` with every process's return code and captured output.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

_POSIX = os.name == "posix"


@dataclasses.dataclass
class LaunchResult:
  """What a multi-process launch ended with.

  Attributes:
    returncodes: per process; negative ``-s`` for a process ended by signal ``s`` (including
      those the launcher stopped after another one failed or the timeout passed).
    outputs: per process, its merged stdout and stderr without prefixes ("" unless captured).
    failed_process: the first process seen exiting non-zero; None if all succeeded or the
      launch timed out first.
    timed_out: the launcher stopped every process because ``timeout`` passed.
  """

  returncodes: list[int]
  outputs: list[str]
  failed_process: int | None = None
  timed_out: bool = False

  @property
  def ok(self) -> bool:
    return not self.timed_out and all(rc == 0 for rc in self.returncodes)

  @property
  def returncode(self) -> int:
    """A shell-style exit status: 0, the failing process's code, 128 + signal, or 124."""
    if self.timed_out:
      return 124
    if self.failed_process is None:
      return 0
    rc = self.returncodes[self.failed_process]
    return 128 - rc if rc < 0 else rc

  def check(self, tail_lines: int = 30) -> LaunchResult:
    """Returns ``self`` if every process succeeded, else raises with the end of each output."""
    if self.ok:
      return self
    what = ("timed out" if self.timed_out else
            f"process {self.failed_process} exited with {self.returncodes[self.failed_process]}")
    parts = [f"multi-process launch failed: {what}; return codes {self.returncodes}"]
    for i, out in enumerate(self.outputs):
      tail = "\n".join(out.splitlines()[-tail_lines:])
      parts.append(f"--- process {i} (last {tail_lines} lines) ---\n{tail}")
    raise RuntimeError("\n".join(parts))


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port that is free on ``host`` right now (the OS picks it; it may be taken later)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, coordinator_address: str,
                devices_per_process: int | None,
                env: Mapping[str, str | None] | None = None,
                base: Mapping[str, str] | None = None) -> dict[str, str]:
  """The environment of process ``process_id``: ``base`` (default ``os.environ``), then ``env``
  (a None value removes the variable), then the ``JAX_*`` variables of the launch."""
  out = dict(os.environ if base is None else base)
  for key, value in (env or {}).items():
    if value is None:
      out.pop(key, None)
    else:
      out[key] = str(value)
  out.update(
      JAX_COORDINATOR_ADDRESS=coordinator_address,
      JAX_NUM_PROCESSES=str(num_processes),
      JAX_PROCESS_ID=str(process_id),
      # Lines reach the launcher as they are written, not when a block buffer fills.
      PYTHONUNBUFFERED="1")
  if devices_per_process is not None:
    out["JAX_NUM_CPU_DEVICES"] = str(devices_per_process)
  return out


class _Process:
  """One child: its Popen, and a thread copying its output lines to the echo/log/buffer."""

  def __init__(self, index: int, command: Sequence[str], env: dict[str, str], cwd: str | None,
               echo, log_path: str | None, capture: bool):
    self.index = index
    self.lines: list[str] = []
    self._capture = capture
    self._echo = echo
    self._log = open(log_path, "w", encoding="utf-8") if log_path else None  # noqa: SIM115
    self.popen = subprocess.Popen(
        list(command), env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=_POSIX)
    self._thread = threading.Thread(target=self._pump, daemon=True)
    self._thread.start()

  def _pump(self):
    for raw in iter(self.popen.stdout.readline, b""):
      line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
      if self._capture:
        self.lines.append(line)
      if self._log:
        self._log.write(line + "\n")
        self._log.flush()
      if self._echo:
        self._echo(self.index, line)
    self.popen.stdout.close()

  def signal(self, sig: int):
    """Sends ``sig`` to the child's process group (its own subprocesses included)."""
    if self.popen.poll() is not None:
      return
    try:
      if _POSIX:
        os.killpg(self.popen.pid, sig)
      elif sig == getattr(signal, "SIGKILL", None):
        self.popen.kill()
      else:
        self.popen.terminate()
    except ProcessLookupError:
      pass

  def finish(self) -> str:
    """Waits for the output thread after the child has exited; returns the captured output."""
    self._thread.join(timeout=10)
    if self._log:
      self._log.close()
    return "\n".join(self.lines) + ("\n" if self.lines else "")


def _stop(procs: Sequence[_Process], grace: float):
  """SIGTERM to every running child, SIGKILL to those still running after ``grace`` seconds."""
  for p in procs:
    p.signal(signal.SIGTERM)
  deadline = time.monotonic() + grace
  for p in procs:
    try:
      p.popen.wait(timeout=max(deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
      p.signal(getattr(signal, "SIGKILL", signal.SIGTERM))
  for p in procs:
    p.popen.wait()


def _printer(stream):
  lock = threading.Lock()

  def echo(index: int, line: str):
    with lock:
      stream.write(f"[p{index}] {line}\n")
      stream.flush()

  return echo


def launch(command: Sequence[str], num_processes: int = 2, devices_per_process: int | None = 1,
           env: Mapping[str, str | None] | None = None, timeout: float | None = None, *,
           cwd: str | None = None, log_dir: str | None = None, echo: bool = True,
           capture: bool = True, grace_period: float = 10.0,
           coordinator_port: int | None = None) -> LaunchResult:
  """Runs ``num_processes`` copies of ``command`` as one ``jax.distributed`` job on this machine.

  Args:
    command: the argv every process runs, e.g. ``[sys.executable, "-m", "pfm.train", ...]``.
    num_processes: how many processes (``JAX_NUM_PROCESSES``).
    devices_per_process: ``JAX_NUM_CPU_DEVICES`` of each process; None leaves it unset.
    env: variables set (or, with a None value, removed) on top of ``os.environ``.
    timeout: seconds before every process is stopped and the launch counts as timed out.
    cwd: working directory of the processes (default: this one).
    log_dir: if given, process i's output is also written to ``log_dir/process_{i}.log``.
    echo: print each output line to stdout as ``[p{i}] line``.
    capture: keep each process's output in ``LaunchResult.outputs``.
    grace_period: seconds between SIGTERM and SIGKILL when stopping processes.
    coordinator_port: the coordinator's port on 127.0.0.1 (default: a free one).

  Returns:
    A ``LaunchResult``; ``.returncode`` is 0 only if every process exited 0, ``.check()`` raises
    otherwise. When a process fails the others are stopped, so their codes are negative.
  """
  if num_processes < 1:
    raise ValueError(f"num_processes must be >= 1, got {num_processes}")
  if not command:
    raise ValueError("empty command")
  if log_dir:
    os.makedirs(log_dir, exist_ok=True)
  address = f"127.0.0.1:{coordinator_port or free_port()}"
  printer = _printer(sys.stdout) if echo else None
  procs: list[_Process] = []
  failed, timed_out = None, False
  start = time.monotonic()
  try:
    for i in range(num_processes):
      procs.append(_Process(
          i, command, process_env(i, num_processes, address, devices_per_process, env), cwd,
          printer, os.path.join(log_dir, f"process_{i}.log") if log_dir else None, capture))
    while True:
      codes = [p.popen.poll() for p in procs]
      failed = next((i for i, rc in enumerate(codes) if rc not in (None, 0)), None)
      if failed is not None or all(rc is not None for rc in codes):
        break
      if timeout is not None and time.monotonic() - start > timeout:
        timed_out = True
        break
      time.sleep(0.05)
  finally:
    # Also on KeyboardInterrupt / SystemExit: never leave children (in their own sessions,
    # out of reach of the terminal's Ctrl-C) running.
    _stop(procs, grace_period)
  return LaunchResult(returncodes=[p.popen.returncode for p in procs],
                      outputs=[p.finish() for p in procs], failed_process=failed,
                      timed_out=timed_out)


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m launch.local",
      description="Run N copies of a command as one jax.distributed job on this machine.",
      usage="%(prog)s [--num_processes=N] [--devices_per_process=D] [--log_dir=DIR] "
            "[--timeout=S] -- COMMAND [ARG ...]")
  parser.add_argument("--num_processes", type=int, default=2, help="processes (default 2)")
  parser.add_argument("--devices_per_process", type=int, default=1,
                      help="JAX_NUM_CPU_DEVICES of each process (default 1)")
  parser.add_argument("--log_dir", default=None,
                      help="also write process i's output to LOG_DIR/process_{i}.log")
  parser.add_argument("--timeout", type=float, default=None,
                      help="stop all processes after this many seconds (exit status 124)")
  parser.add_argument("--port", type=int, default=None,
                      help="coordinator port on 127.0.0.1 (default: a free one)")
  parser.add_argument("--grace_period", type=float, default=10.0,
                      help="seconds between SIGTERM and SIGKILL when stopping processes")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
  args = parser.parse_args(argv)
  if args.command[:1] == ["--"]:
    args.command = args.command[1:]
  if not args.command:
    parser.error("no command given; put it after --")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(sys.argv[1:] if argv is None else argv)

  def on_sigterm(signum, frame):  # stop the children as for Ctrl-C
    raise KeyboardInterrupt

  signal.signal(signal.SIGTERM, on_sigterm)
  try:
    result = launch(args.command, args.num_processes, args.devices_per_process,
                    timeout=args.timeout, log_dir=args.log_dir, capture=False,
                    grace_period=args.grace_period, coordinator_port=args.port)
  except KeyboardInterrupt:
    print("launch.local: interrupted; stopped all processes", file=sys.stderr)
    return 130
  except OSError as e:  # the command could not be started
    print(f"launch.local: {e}", file=sys.stderr)
    return 127
  if result.timed_out:
    print(f"launch.local: timed out after {args.timeout} s; stopped all processes",
          file=sys.stderr)
  elif not result.ok:
    print(f"launch.local: process {result.failed_process} exited with "
          f"{result.returncodes[result.failed_process]}; stopped the others "
          f"(return codes {result.returncodes})", file=sys.stderr)
  return result.returncode


if __name__ == "__main__":
  sys.exit(main())
