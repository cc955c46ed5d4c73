"""Test session setup: one persistent XLA compilation cache for the tests and their subprocesses.

Most of the suite's time is compilation of the same few programs (the smoke config's train step
and sampler) in many tests and in the subprocesses of the kill, launch and multi-host tests. JAX's
persistent cache (keyed by the program, the devices and the flags, so results are unchanged)
lets each be compiled once per session. The folder is fresh for every session unless
``JAX_COMPILATION_CACHE_DIR`` is already set.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # before jax is imported by any test module
  _cache = tempfile.mkdtemp(prefix="pfm-tests-xla-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
