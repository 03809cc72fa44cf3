"""The layers import downward only: data -> models -> baselines -> train -> serving, and the
application modules (omnisage/systems.py, omnisage/demo.py) above them all.

A module may import its own layer and the layers below it, never one above (train must not reach
into serving, data must not reach into models). Every import statement counts, including the ones
inside functions, because they are just as much a dependency. No module imports another module's
private (underscore) names either.
"""

import ast
import os

import pytest

from tests.helpers import ROOT

LAYERS = ["data", "models", "baselines", "train", "serving"]
TOP = len(LAYERS)   # omnisage/systems.py, omnisage/demo.py, omnisage/__init__.py


def layer_of(module: str) -> int | None:
  """Index of the layer of a dotted omnisage module name (None outside omnisage)."""
  parts = module.split(".")
  if parts[0] != "omnisage":
    return None
  if len(parts) == 1:
    return 0   # the root package holds only __version__
  if parts[1] not in LAYERS:
    return TOP
  return LAYERS.index(parts[1])


def omnisage_modules():
  for root, _, files in os.walk(os.path.join(ROOT, "omnisage")):
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(root, name)
        module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        yield path, module.removesuffix(".__init__")


def imports_of(path: str):
  """(line, imported module, names) of every import in a file."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name, []
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      yield node.lineno, node.module, [a.name for a in node.names]


def upward_imports() -> list[str]:
  found = []
  for path, module in omnisage_modules():
    own = layer_of(module)
    for line, target, _ in imports_of(path):
      layer = layer_of(target)
      if layer is not None and layer > own:
        found.append(f"{os.path.relpath(path, ROOT)}:{line} imports {target} "
                     f"({LAYERS[own] if own < TOP else 'top'} -> "
                     f"{LAYERS[layer] if layer < TOP else 'top'})")
  return found


def test_no_module_imports_a_layer_above_its_own():
  assert upward_imports() == []


def test_no_module_imports_private_names_of_another():
  found = []
  for path, _ in omnisage_modules():
    for line, target, names in imports_of(path):
      private = [n for n in names if n.startswith("_") and not n.startswith("__")]
      if target.startswith("omnisage") and private:
        found.append(f"{os.path.relpath(path, ROOT)}:{line} imports {private} from {target}")
  assert found == []


@pytest.mark.parametrize("source, expected", [
    ("from omnisage.serving.bundle.loader import load_bundle\n", 1),
    ("def f():\n  from omnisage.serving import index\n", 1),
    ("from omnisage.data.text import normalize\nimport numpy\n", 0),
])
def test_the_checker_sees_upward_imports(tmp_path, monkeypatch, source, expected):
  """The check itself can fail: a train module importing serving (even inside a function) is
  reported; a downward import is not."""
  root = tmp_path / "repo"
  package = root / "omnisage" / "train"
  package.mkdir(parents=True)
  (package / "bad.py").write_text(source)
  monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", str(root))
  assert len(upward_imports()) == expected
