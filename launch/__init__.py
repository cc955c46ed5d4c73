"""Launchers for ``pfm.train``: local multi-process runs, config sweeps, TPU pods and SLURM.

``launch.local`` starts N processes of one command on this machine, wired together through
``jax.distributed``; ``launch.sweep`` expands a config's ``sweep()`` into one training run per
set of overrides. ``tpu_pod.sh`` and ``slurm.sbatch`` run the same training command on every host
of a TPU VM slice or a SLURM allocation. See ``launch/README.md``.
"""
