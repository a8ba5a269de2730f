"""The package's shape, as the README and each part's `__init__` state it: imports run downward only (as each
part's "May import:" line says), no import circle between modules (imports inside functions counted), no
module over 500 lines, and the README's module map names every module there is."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import nested_reft

PACKAGE = Path(nested_reft.__file__).parent
README = PACKAGE.parent / "README.md"
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
PARTS = sorted(path.parent.name for path in PACKAGE.glob("*/__init__.py"))


def imported_modules(source: str, this: str, is_package: bool = False) -> set[str]:
    """Every nested_reft module the code `source` of module `this` imports, at the top or inside a function,
    resolved to a module that exists (`from nested_reft.x import name` names x, or x.name where that is a module)."""
    tree = ast.parse(source)
    package = this if is_package else this.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in MODULES and target != this)
    return found


GRAPH = {name: imported_modules(path.read_text(encoding="utf-8"), name, path.name == "__init__.py")
         for name, path in MODULES.items()}


def part_of(module: str) -> str:
    """The part (subpackage) a module belongs to; the top-level modules (the CLI, the package) are their own."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in PARTS) else module


def allowed_parts(part: str) -> set[str]:
    """The parts `part` may import, read from the "May import:" line of its __init__ docstring."""
    doc = ast.get_docstring(ast.parse((PACKAGE / part / "__init__.py").read_text(encoding="utf-8"))) or ""
    line = re.search(r"^May import: (.+?)\.?$", doc, re.M)
    assert line, f"nested_reft/{part}/__init__.py: its docstring has no 'May import: ...' line"
    return set() if line.group(1) == "nothing" else {name.strip() for name in line.group(1).split(",")}


def test_every_part_says_what_it_holds_and_may_import_only_parts_that_exist():
    assert PARTS, "no subpackages found"
    for part in PARTS:
        unknown = allowed_parts(part) - set(PARTS)
        assert not unknown, f"{part}: 'May import' names {unknown}, which are not parts"


@pytest.mark.parametrize("part", PARTS)
def test_a_part_imports_only_the_parts_its_init_allows(part):
    allowed = allowed_parts(part) | {part}
    wrong = sorted((module, target) for module, targets in GRAPH.items() if part_of(module) == part
                   for target in targets if part_of(target) not in allowed)
    assert not wrong, f"{part} imports parts its __init__ does not allow: {wrong}"


def test_the_may_import_lines_run_downward_only():
    """No two parts may import each other, directly or through others: the parts have an order."""
    reachable = {part: set(allowed_parts(part)) for part in PARTS}
    for _ in PARTS:
        for part in PARTS:
            reachable[part] |= {deeper for allowed in list(reachable[part]) for deeper in reachable.get(allowed, ())}
    assert not [part for part in PARTS if part in reachable[part]]


def test_only_the_cli_imports_the_experiments():
    importers = {module for module, targets in GRAPH.items() if part_of(module) != "experiments"
                 and any(part_of(target) == "experiments" for target in targets)}
    assert importers <= {"nested_reft.cli"}, importers


def test_no_import_circle_between_modules_counting_imports_inside_functions():
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target] if target in path else [module, target]
                pytest.fail(f"import circle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in MODULES:
        if module not in state:
            visit(module, [module])


def test_the_import_reader_sees_imports_inside_functions_and_relative_ones():
    source = ("import torch\n"
              "def f():\n    from nested_reft.store.files import read_json\n"
              "def g():\n    from . import grpo\n    import nested_reft.nesting.layers as layers\n")
    assert imported_modules(source, "nested_reft.algorithm.importance") == {
        "nested_reft.store.files", "nested_reft.algorithm.grpo", "nested_reft.nesting.layers"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_over_500_lines(module):
    lines = MODULES[module].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{MODULES[module]} has {lines} lines"


def test_the_readme_module_map_names_every_module_and_nothing_else():
    """The README's map is a table of `part/` rows, each listing its modules in backquotes."""
    text = README.read_text(encoding="utf-8")
    section = text.split("<!-- module map -->")
    assert len(section) == 3, "README.md: the module map sits between two '<!-- module map -->' lines"
    rows = re.findall(r"^\| `(\w+)/` \| (.+?) \|", section[1], re.M)
    named = {f"nested_reft.{part}.{name}" for part, modules in rows for name in re.findall(r"`(\w+)`", modules)}
    actual = {module for module in MODULES if module.count(".") == 2}
    assert {part for part, _ in rows} == set(PARTS)
    assert named == actual, f"missing from the README: {sorted(actual - named)}; not in the package: {sorted(named - actual)}"


def test_the_public_api_is_importable_from_the_top_and_loads_nothing_before_use():
    """`from nested_reft import train, ...` gives the objects the parts define; `import nested_reft` alone loads
    neither torch nor a part (a fresh interpreter, so that this test session's imports do not count)."""
    import subprocess
    import sys

    from nested_reft import evaluate, generate_rollouts, load_model, nested, train, TrainConfig
    from nested_reft.config import TrainConfig as config_train_config
    from nested_reft.engines.rollout import generate_rollouts as rollout_generate
    from nested_reft.evaluation.evaluate import evaluate as evaluation_evaluate
    from nested_reft.models.loading import load_model as loading_load_model
    from nested_reft.nesting.layers import nested as layers_nested
    from nested_reft.training.trainer import train as trainer_train

    assert (train, evaluate, nested, generate_rollouts, load_model, TrainConfig) == (
        trainer_train, evaluation_evaluate, layers_nested, rollout_generate, loading_load_model, config_train_config)
    assert set(nested_reft.__all__) <= set(dir(nested_reft))
    with pytest.raises(AttributeError, match="no attribute 'trainer'"):
        nested_reft.trainer  # noqa: B018 (old module paths are in CHANGELOG.md, not aliased)
    loaded = subprocess.run([sys.executable, "-c", "import sys, nested_reft; print(sorted(m for m in sys.modules "
                             "if m == 'torch' or m.startswith('nested_reft.')))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_the_changelog_says_where_each_old_module_path_went():
    """Each row of CHANGELOG.md's move table: the new path imports, and the old one is gone (no alias to drift) or
    is now the name of a part (models, nesting, tasks: folders whose modules the table names)."""
    import importlib

    rows = re.findall(r"^\| `(nested_reft\.\w+)` \| `(nested_reft[\w.]*)`", (PACKAGE.parent / "CHANGELOG.md").read_text(
        encoding="utf-8"), re.M)
    assert len(rows) == 43  # the 42 modules that moved, and config (now a package)
    for old, new in rows:
        importlib.import_module(new)
        if old.split(".")[-1] in PARTS:
            assert hasattr(importlib.import_module(old), "__path__"), old
        elif old != new:
            with pytest.raises(ModuleNotFoundError):
                importlib.import_module(old)
