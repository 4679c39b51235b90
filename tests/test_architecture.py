"""The package's layers import one way: core <- training <- research <- command line, with no cycles, and every
file stays under the house limit of 400 lines.

Read from the source (AST), imports inside functions and under `if __name__ == "__main__":` included: a shim that
imports the command line from the library closes a cycle like any other import. The checks are functions of a
package root, so the last tests plant a cycle and a long file in a copy and see them fail.
"""

import ast
import pathlib
import shutil

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "dispersion_jax"
MAX_LINES = 400

# Layer of each module (dotted names without the package prefix); a name ending in "." covers a subpackage.
CORE = (
    "__init__",
    "parallel",  # the package files of the two folders whose modules sit in two layers (they import nothing)
    "evaluation",
    "errors",
    "models.",
    "losses.",
    "interop.",
    "storage.",
    "parallel.backend",
    "parallel.quiet",
    "parallel.lifeline",
    "evaluation.decode",
    "evaluation.condensation",
)
TRAINING = (
    "config",
    "parallel.sharding",
    "parallel.distributed",
    "training.",
    "data.",
    "compile.",
    "evaluation.harness",
    "evaluation.harness_tasks",
    "evaluation.evaluate",
    "evaluation.tasks.",
)
RESEARCH = ("research.", "benchmarks.")
CLI = ("cli.", "__main__")
LAYERS = {"core": (0, CORE), "training": (1, TRAINING), "research": (2, RESEARCH), "cli": (3, CLI)}
# What the numerical core must not depend on: run configs, files and orchestration libraries.
CORE_FORBIDDEN = ("ml_collections", "orbax", "grain", "tensorflow_datasets", "argparse", "tqdm", "tensorboardX")
ARGV_READERS = ("argparse",)


def _modules(pkg: pathlib.Path = PKG) -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(pkg.rglob("*.py")):
    rel = path.relative_to(pkg).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
      parts = parts[:-1] + ["__init__"]
    out[".".join(parts)] = path
  return out


MODULES = _modules()


def layer_of(name: str) -> str:
  base = name.removesuffix(".__init__") if name != "__init__" else name
  for layer, (_, names) in LAYERS.items():
    for n in names:
      if (n.endswith(".") and (base + ".").startswith(n)) or base == n:
        return layer
  raise AssertionError(f"dispersion_jax.{name} has no layer: add it to one in tests/test_architecture.py")


def _imports(path: pathlib.Path) -> list[str]:
  """Absolute module names imported anywhere in the file, `if __name__ == "__main__":` blocks included."""
  tree = ast.parse(path.read_text())
  found = []

  def visit(node):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.Import):
        found.extend(a.name for a in child.names)
      elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
        found.append(child.module)
        found.extend(f"{child.module}.{a.name}" for a in child.names)  # `from pkg import module`
      visit(child)

  visit(tree)
  return found


def _package_edges(name: str, modules: dict[str, pathlib.Path]) -> set[str]:
  """The package modules `name` imports (a package import counts as its __init__)."""
  edges = set()
  for imp in _imports(modules[name]):
    if imp != "dispersion_jax" and not imp.startswith("dispersion_jax."):
      continue
    target = imp.removeprefix("dispersion_jax").removeprefix(".") or "__init__"
    if target in modules:
      edges.add(target)
    elif f"{target}.__init__" in modules:
      edges.add(f"{target}.__init__")
  edges.discard(name)
  return edges


def _graph(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
  return {name: _package_edges(name, modules) for name in modules}


GRAPH = _graph(MODULES)


def test_every_module_has_a_layer():
  for name in MODULES:
    layer_of(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_import_of_a_higher_layer(name):
  mine = LAYERS[layer_of(name)][0]
  for target in sorted(GRAPH[name]):
    theirs = LAYERS[layer_of(target)][0]
    assert theirs <= mine, (
        f"dispersion_jax.{name} ({layer_of(name)}) imports dispersion_jax.{target} "
        f"({layer_of(target)}): imports must point core <- training <- research <- cli"
    )


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle of `graph` (module names, first == last), or None."""
  state: dict[str, int] = {}  # 1 = on the current path, 2 = done

  def dfs(node, path):
    state[node] = 1
    for nxt in sorted(graph[node]):
      if nxt.endswith("__init__") and node.startswith(nxt.removesuffix("__init__")):
        continue  # a package's own __init__ runs before its submodules anyway: not a cycle of ours
      if state.get(nxt) == 1:
        return path[path.index(nxt) :] + [nxt]
      if state.get(nxt) is None:
        found = dfs(nxt, path + [nxt])
        if found:
          return found
    state[node] = 2
    return None

  for name in sorted(graph):
    if state.get(name) is None:
      found = dfs(name, [name])
      if found:
        return found
  return None


def long_files(pkg: pathlib.Path) -> list[str]:
  """The package's Python files over MAX_LINES lines, with their length."""
  lengths = {p: len(p.read_text().splitlines()) for p in sorted(pkg.rglob("*.py"))}
  return [f"{p.relative_to(pkg.parent)} ({n} lines)" for p, n in lengths.items() if n > MAX_LINES]


def test_no_import_cycles():
  cycle = find_cycle(GRAPH)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_file_is_under_the_house_limit():
  assert not long_files(PKG), f"over {MAX_LINES} lines, split by concept: {long_files(PKG)}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if layer_of(n) == "core"))
def test_core_takes_no_run_config_and_does_no_orchestration(name):
  bad = [imp for imp in _imports(MODULES[name]) if imp.split(".")[0] in CORE_FORBIDDEN]
  assert not bad, f"dispersion_jax.{name} is core but imports {bad}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if layer_of(n) != "cli"))
def test_only_the_command_line_layer_reads_argv(name):
  source = MODULES[name].read_text()
  bad = [imp for imp in _imports(MODULES[name]) if imp in ARGV_READERS]
  assert not bad and "sys.argv" not in source, f"dispersion_jax.{name} parses argv: move it to cli/"


def test_the_checker_sees_an_upward_import(monkeypatch):
  """The layer check can fail: a core module importing the CLI."""
  monkeypatch.setitem(GRAPH, "losses.objective", GRAPH["losses.objective"] | {"cli.train"})
  with pytest.raises(AssertionError, match="imports must point"):
    test_no_import_of_a_higher_layer("losses.objective")


def _copy(tmp_path) -> pathlib.Path:
  pkg = tmp_path / "dispersion_jax"
  shutil.copytree(PKG, pkg, ignore=shutil.ignore_patterns("__pycache__", "*.txtpb", "*.jsonl"))
  assert find_cycle(_graph(_modules(pkg))) is None and not long_files(pkg)
  return pkg


def test_a_planted_shim_cycle_is_found(tmp_path):
  """The shape of the cycle main once had: a library module whose `__main__` block imports its own CLI."""
  pkg = _copy(tmp_path)
  with open(pkg / "training" / "train.py", "a") as fh:
    fh.write('\n\nif __name__ == "__main__":\n  from dispersion_jax.cli.train import main\n\n  main()\n')
  cycle = find_cycle(_graph(_modules(pkg)))
  assert cycle is not None and "training.train" in cycle and "cli.train" in cycle


def test_a_planted_401_line_file_is_found(tmp_path):
  pkg = _copy(tmp_path)
  (pkg / "losses" / "long.py").write_text("x = 0\n" * (MAX_LINES + 1))
  assert long_files(pkg) == [f"dispersion_jax/losses/long.py ({MAX_LINES + 1} lines)"]


def _console_scripts() -> dict[str, str]:
  import tomllib

  with open(PKG.parent / "pyproject.toml", "rb") as fh:
    return tomllib.load(fh)["project"]["scripts"]


@pytest.mark.parametrize("script", sorted(_console_scripts()))
def test_every_console_script_answers_help(script, capsys):
  """`pip install .` puts these on PATH (checked in a fresh venv for the release notes); each resolves to a
  command-line main that prints its flags and exits 0."""
  import importlib

  module, _, name = _console_scripts()[script].partition(":")
  assert module.startswith("dispersion_jax.cli."), "console scripts point into the command-line layer"
  main = getattr(importlib.import_module(module), name)
  with pytest.raises(SystemExit) as e:
    main(["--help"])
  assert e.value.code == 0 and "usage:" in capsys.readouterr().out


def test_console_scripts_and_python_m_commands_are_one_table():
  """`dispersion-NAME` and `python -m dispersion_jax NAME` run the same main (one scheme, dispersion_jax/__main__.py)."""
  from dispersion_jax.__main__ import COMMANDS

  assert _console_scripts() == {f"dispersion-{k}": f"dispersion_jax.cli.{v}:main" for k, v in COMMANDS.items()}
