"""The package's modules import each other without a cycle.

A cycle works only while every module in it is imported in one order (and a
lazy, function-level import merely postpones the failure), so any cycle
counts: module-level and function-level imports alike.
"""

from __future__ import annotations

import ast
import pathlib

from conftest import REPO

PACKAGE = "mnv2_flax"


def _imported_modules(tree: ast.AST, modules: set[str], module: str) -> set[str]:
  """The package's modules that `module`'s syntax tree imports, anywhere."""
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # Relative: `from . import x`, `from .x import y`.
        base = ".".join([PACKAGE, node.module or ""]).rstrip(".")
      else:
        base = node.module or ""
      # `from mnv2_flax import x` imports module x; `from mnv2_flax.x import
      # y` imports x (y is a name in it, or a submodule of x).
      targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
    else:
      continue
    for target in targets:
      parts = target.split(".")
      if parts[0] == PACKAGE and len(parts) > 1 and parts[1] in modules:
        found.add(parts[1])
  found.discard(module)
  return found


def import_graph(package_dir: pathlib.Path) -> dict[str, set[str]]:
  """Module name -> the package's modules it imports."""
  paths = {p.stem: p for p in sorted(package_dir.glob("*.py"))}
  return {
      name: _imported_modules(ast.parse(path.read_text(), str(path)), set(paths), name)
      for name, path in paths.items()
  }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A cycle as [a, b, ..., a], or None: depth-first search for a back edge."""
  done, path = set(), []

  def visit(node: str) -> list[str] | None:
    if node in path:
      return path[path.index(node) :] + [node]
    if node in done:
      return None
    path.append(node)
    for successor in sorted(graph.get(node, ())):
      cycle = visit(successor)
      if cycle:
        return cycle
    path.pop()
    done.add(node)
    return None

  for node in sorted(graph):
    cycle = visit(node)
    if cycle:
      return cycle
  return None


def test_find_cycle_names_the_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert find_cycle(graph) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_graph_sees_function_level_and_from_imports(tmp_path):
  (tmp_path / "a.py").write_text(
      "from mnv2_flax import b\n"
      "def f():\n"
      "  from mnv2_flax.c import thing\n"
      "  import mnv2_flax.d\n"
      "  from . import e\n"
  )
  for name in "bcde":
    (tmp_path / f"{name}.py").write_text("import os\n")
  assert import_graph(tmp_path)["a"] == {"b", "c", "d", "e"}


def test_package_imports_have_no_cycle():
  graph = import_graph(REPO / PACKAGE)
  assert "layers" in graph and "data" in graph  # The right directory.
  cycle = find_cycle(graph)
  assert cycle is None, f"import cycle: {' -> '.join(cycle)}"
