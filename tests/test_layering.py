"""The package's import structure: layers that only import downwards, no circles, no hidden imports.

Read from the source (``ast``), so it checks every module without importing any.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lowest first. A module may import modules of its own layer (without a circle) or of a lower one.
LAYERS = (
    ("pfm.errors", "pfm.distributed", "pfm.batch"),
    ("pfm.pyramid",),                                  # the pure maths of both papers
    ("pfm.models",),                                   # the MM-DiT and its parts
    ("pfm.objective", "pfm.vae_objective", "pfm.parallel", "pfm.checkpointing",
     "pfm.throughput", "pfm.lora"),
    ("pfm.spec",),                                     # the resolved run spec
    ("pfm.data",),                                     # manifests, video I/O, layout, pipeline
    ("pfm.metrics",),                                  # download-free video metrics
    ("pfm.state", "pfm.validation", "pfm.latent"),
    ("pfm.sample",),
    ("pfm.evaluate", "pfm.digit_classifier", "pfm.app"),
    ("pfm.train",),
    ("pfm.train_vae", "pfm.extract", "pfm.convert"),
    ("pfm.benchmark", "pfm.results"),
)


def _modules() -> dict[str, str]:
  modules = {}
  for folder, _, files in os.walk(os.path.join(ROOT, "pfm")):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        modules[module.removesuffix(".__init__")] = path
  return modules


MODULES = _modules()


def _imports(module: str) -> list[tuple[str, int, bool]]:
  """``(imported pfm module, line, at module level)`` for each import of a pfm module."""
  path = MODULES[module]
  tree = ast.parse(open(path).read())
  top = {id(node) for node in tree.body}
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parent = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parent + ([base] if base else []))
      names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
               for alias in node.names]
    else:
      continue
    for name in names:
      while name and name not in MODULES:
        name = name.rpartition(".")[0]
      if name and name != module:
        found.append((name, node.lineno, id(node) in top))
  return found


def _layer(module: str) -> int:
  for i, layer in enumerate(LAYERS):
    if any(module == prefix or module.startswith(prefix + ".") for prefix in layer):
      return i
  raise AssertionError(f"{module} is in no layer of LAYERS")


def test_every_module_has_a_layer():
  for module in MODULES:
    if module != "pfm":
      _layer(module)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "pfm"))
def test_imports_go_down_and_sit_at_the_top(module):
  for imported, line, at_top in _imports(module):
    assert at_top, f"{module}:{line} imports {imported} inside a function"
    if imported != "pfm":
      assert _layer(imported) <= _layer(module), (
          f"{module}:{line} imports {imported}, a higher layer")


def test_no_import_circle():
  graph = {m: {i for i, _, _ in _imports(m)} for m in MODULES}
  done, active = set(), []

  def visit(module):
    if module in active:
      raise AssertionError("import circle: " + " -> ".join(active[active.index(module):]
                                                          + [module]))
    if module in done:
      return
    active.append(module)
    for imported in sorted(graph[module]):
      visit(imported)
    active.pop()
    done.add(module)

  for module in sorted(graph):
    visit(module)
