"""Multi-host start-up: `jax.distributed.initialize` from flags, the environment, TPU or SLURM.

Every process of a multi-host run executes the same command (JAX's multi-controller model); this
module connects them before anything touches a device. Sources, first match wins:

1. explicit arguments (``python -m pfm.train --coordinator_address=HOST:PORT --num_processes=N
   --process_id=I``);
2. the environment: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``
   (what ``launch/local.py`` sets);
3. a cluster JAX detects on its own: a Cloud TPU VM (see `cluster_detected`) or a SLURM job step
   with more than one task (``SLURM_NTASKS`` > 1); then ``jax.distributed.initialize()`` reads
   everything from the cluster;
4. otherwise a single process: nothing to do.

On CPU, processes exchange data through gloo collectives (``jax_cpu_collectives_implementation``),
and ``JAX_NUM_CPU_DEVICES`` (a JAX option) sets the number of devices of each process.
"""

from __future__ import annotations

import glob
import os

from absl import flags, logging
import jax


def cluster_detected() -> str | None:
  """The cluster JAX can configure itself on ("tpu", "slurm"), or None.

  A Cloud TPU VM is recognised by its TPU device files (``/dev/accel*``, or ``/dev/vfio/<n>`` on
  newer generations) or GKE's ``TPU_WORKER_HOSTNAMES``; JAX then finds the slice's workers from
  the VM's metadata, and a single-host slice becomes a one-process run.
  """
  if (os.environ.get("TPU_WORKER_HOSTNAMES") or glob.glob("/dev/accel[0-9]*")
      or glob.glob("/dev/vfio/[0-9]*")):
    return "tpu"
  if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  return None


def define_flags() -> None:
  """Defines the multi-process flags every command takes (``--coordinator_address``,
  ``--num_processes``, ``--process_id``), read by `initialize_from_flags`."""
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 for a multi-process run (or JAX_COORDINATOR_ADDRESS;"
                      " detected on TPU slices and under SLURM).")
  flags.DEFINE_integer("num_processes", None, "Processes of a multi-process run.")
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


def initialize_from_flags() -> bool:
  """`initialize` with the flags of `define_flags`."""
  f = flags.FLAGS
  return initialize(f.coordinator_address, f.num_processes, f.process_id)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Connects this process to the others of the run, if there are any.

  Call once, before the first JAX computation.

  Args:
    coordinator_address: ``host:port`` of process 0's coordinator service.
    num_processes: number of processes of the run.
    process_id: this process's index in ``[0, num_processes)``.

  Returns:
    True if `jax.distributed` was initialised (a multi-process run), False for a single process.

  Raises:
    ValueError: if only some of the three settings are given, or the process id is out of range.
  """
  env = os.environ
  address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  count = num_processes if num_processes is not None else env.get("JAX_NUM_PROCESSES")
  index = process_id if process_id is not None else env.get("JAX_PROCESS_ID")
  given = [v is not None for v in (address, count, index)]
  if any(given):
    if not all(given):
      raise ValueError(
        "multi-process run: give all of --coordinator_address, --num_processes and --process_id "
        "(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), got "
        f"{address!r}, {count!r}, {index!r}")
    count, index = int(count), int(index)
    if not 0 <= index < count:
      raise ValueError(f"process id {index} is not in [0, {count})")
    if count == 1:
      return False
    _cpu_collectives()
    jax.distributed.initialize(coordinator_address=address, num_processes=count,
                               process_id=index)
  elif cluster_detected():
    _cpu_collectives()
    jax.distributed.initialize()
  else:
    return False
  logging.info("Process %d of %d, %d local of %d devices (%s).", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].device_kind)
  return True


def _cpu_collectives() -> None:
  """Settings for every multi-process start: CPU collectives and the default SIGTERM action.

  gloo gives CPU devices (tests, laptops) cross-process collectives; harmless on accelerators.
  JAX's preemption service would take over SIGTERM and only note it, so a process whose peer
  died would ignore its launcher's (or SLURM's, or a TPU VM's) stop request until it is killed;
  with it off, SIGTERM stops the process at once. Checkpoints commit atomically, so a stop at any
  moment loses only the steps since the last checkpoint.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_enable_preemption_service", False)
