"""The ``--config=FILE:ARG`` argument: comma-separated variant names, parsed one way everywhere.

Used by every config's ``get_config(arg)`` and ``sweep(arg)`` (``launch.sweep`` passes the same
``ARG`` to both).
"""

from __future__ import annotations

from collections.abc import Iterable


def parse_variants(arg: str | None, known: Iterable[str]) -> frozenset[str]:
  """``"ddim,smoke"`` -> ``{"ddim", "smoke"}``; ``None`` or ``""`` -> no variant.

  Raises:
    ValueError: naming the unknown variants and the known ones.
  """
  known = tuple(known)
  variants = frozenset(filter(None, (v.strip() for v in (arg or "").split(","))))
  unknown = variants - set(known)
  if unknown:
    raise ValueError(f"unknown config variants {sorted(unknown)}; known: {', '.join(known)}")
  return variants
