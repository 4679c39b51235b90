"""The package's layers import one way: core <- training <- research <- command line, with no cycles.

Read from the source (AST), imports inside functions included; only the bodies of `if __name__ == "__main__":`
blocks are left out (they run only as programs: `python -m dispersion_jax.train` keeps its name that way).
"""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "dispersion_jax"

# Layer of each module (dotted names without the package prefix); a name ending in "." covers a subpackage.
CORE = (
    "__init__",
    "errors",
    "backend",
    "quiet",
    "lifeline",
    "dispersion",
    "dispersion_fused",
    "dispersion_pallas",
    "models.",
    "objective",
    "baselines",
    "fused_ce",
    "hf",
    "condensation",
    "decode",
    "lora",
    "peft",
)
TRAINING = (
    "config",
    "sharding",
    "distributed",
    "optim",
    "train_step",
    "checkpoint",
    "metrics",
    "loop",
    "train",
    "dry_run",
    "dry_run_report",
    "chips",
    "targets",
    "lora_run",
    "tokenizer",
    "harness",
    "harness_tasks",
    "data.",
)
RESEARCH = ("research.",)
CLI = ("cli.", "evaluate", "sweep", "bench")  # evaluate / sweep / bench: two-line shims keeping `python -m` names
LAYERS = {"core": (0, CORE), "training": (1, TRAINING), "research": (2, RESEARCH), "cli": (3, CLI)}
# What the numerical core must not depend on: run configs, files and orchestration libraries.
CORE_FORBIDDEN = ("ml_collections", "orbax", "grain", "tensorflow_datasets", "argparse", "tqdm", "tensorboardX")
ARGV_READERS = ("argparse",)


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(PKG.rglob("*.py")):
    rel = path.relative_to(PKG).with_suffix("")
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


def _is_main_guard(node: ast.AST) -> bool:
  return (
      isinstance(node, ast.If)
      and isinstance(node.test, ast.Compare)
      and isinstance(node.test.left, ast.Name)
      and node.test.left.id == "__name__"
  )


def _imports(path: pathlib.Path) -> list[str]:
  """Absolute module names imported anywhere in the file except under `if __name__ == "__main__":`."""
  tree = ast.parse(path.read_text())
  found = []

  def visit(node):
    for child in ast.iter_child_nodes(node):
      if _is_main_guard(child):
        continue
      if isinstance(child, ast.Import):
        found.extend(a.name for a in child.names)
      elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
        found.append(child.module)
        found.extend(f"{child.module}.{a.name}" for a in child.names)  # `from pkg import module`
      visit(child)

  visit(tree)
  return found


def _package_edges(name: str) -> set[str]:
  """The package modules `name` imports (a package import counts as its __init__)."""
  edges = set()
  for imp in _imports(MODULES[name]):
    if imp != "dispersion_jax" and not imp.startswith("dispersion_jax."):
      continue
    target = imp.removeprefix("dispersion_jax").removeprefix(".") or "__init__"
    if target in MODULES:
      edges.add(target)
    elif f"{target}.__init__" in MODULES:
      edges.add(f"{target}.__init__")
  edges.discard(name)
  return edges


GRAPH = {name: _package_edges(name) for name in MODULES}


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


def test_no_import_cycles():
  state: dict[str, int] = {}  # 1 = on the current path, 2 = done

  def dfs(node, path):
    state[node] = 1
    for nxt in sorted(GRAPH[node]):
      if nxt.endswith("__init__") and node.startswith(nxt.removesuffix("__init__")):
        continue  # a package's own __init__ runs before its submodules anyway: not a cycle of ours
      if state.get(nxt) == 1:
        cycle = path[path.index(nxt) :] + [nxt]
        raise AssertionError("import cycle: " + " -> ".join(cycle))
      if state.get(nxt) is None:
        dfs(nxt, path + [nxt])
    state[node] = 2

  for name in sorted(MODULES):
    if state.get(name) is None:
      dfs(name, [name])


@pytest.mark.parametrize("name", sorted(n for n in MODULES if layer_of(n) == "core"))
def test_core_takes_no_run_config_and_does_no_orchestration(name):
  bad = [imp for imp in _imports(MODULES[name]) if imp.split(".")[0] in CORE_FORBIDDEN]
  assert not bad, f"dispersion_jax.{name} is core but imports {bad}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if layer_of(n) != "cli"))
def test_only_the_command_line_layer_reads_argv(name):
  source = MODULES[name].read_text()
  bad = [imp for imp in _imports(MODULES[name]) if imp in ARGV_READERS]
  assert not bad and "sys.argv" not in source, f"dispersion_jax.{name} parses argv: move it to cli/"


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
  """The checks above can fail: a core module importing the CLI is both."""
  monkeypatch.setitem(GRAPH, "objective", GRAPH["objective"] | {"cli.train"})
  with pytest.raises(AssertionError, match="imports must point"):
    test_no_import_of_a_higher_layer("objective")
  with pytest.raises(AssertionError, match="import cycle"):
    test_no_import_cycles()


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
