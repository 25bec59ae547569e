"""The house's floors: no import cycle between raymeta's modules, and no floor imports a higher
one. Every ``import`` counts, also those inside functions (raymeta imports lazily so that
``raymeta --help`` stays fast; a lazy import is still a dependency).

The floors, lowest first; a module may import its own floor and the floors below it:

==  ======================  ===============================================================
0   errors, console         user-input errors, progress lines
1   data, models            datasets and splits, backbones (plain PyTorch)
2   schedules               LR schedules: hand-designed families, MLR-SNet
3   meta                    meta-learning: look-ahead, MLR-SNet meta-training, MFM, MWN
4   config, pipelines       the validated pipeline sections (pydantic; reads the registries
                            of the floors below: schedule families, long-tail methods), the
                            shipped pipeline files
5   spec                    the run spec (what one run is)
6   tracking, report        MLflow store, runs and registry; tables and plots
7   train                   the loop, update rules, run assembly, devices, Ray Train glue
8   session                 the orchestration skeleton (output dir, MLflow, registry, Ray)
9   tune, longtail_study    the stages: comparison, transfer study, long-tail study
10  pipeline                every section of a pipeline in one session
11  jobs, cli               the command line and Ray Jobs
==  ======================  ===============================================================

The lower floors (0-3) import no Ray, MLflow, Optuna or pydantic. A new module goes on the
floor of its package (or gets a row here).
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "raymeta"
FLOORS = [
    {"errors", "console"},
    {"data", "models"},
    {"schedules"},
    {"meta"},
    {"config", "pipelines"},
    {"spec"},
    {"tracking", "report"},
    {"train"},
    {"session"},
    {"tune", "longtail_study"},
    {"pipeline"},
    {"jobs", "cli"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path, package_only: bool = True) -> set[str]:
    """The raymeta modules that ``path`` imports, anywhere in it (``package_only=False``: every
    module it imports)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from raymeta.x import y`: y may be a module
                found.add(f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base)
    if not package_only:
        return found
    return {m for m in found if m.startswith("raymeta.") and m != module}


def floor_of(module: str) -> int:
    top = module.split(".")[1]
    for floor, names in enumerate(FLOORS):
        if top in names:
            return floor
    raise AssertionError(f"{module}: raymeta.{top} is on no floor; add it to FLOORS")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = [p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py"]
    return {module_name(p): imports_of(p) for p in files}


def test_the_import_graph_is_read(graph):
    # the parser sees lazy imports and resolves `from package import module`
    assert "raymeta.train.build" in graph["raymeta.train.ray_train"]  # inside a function
    assert "raymeta.session" in graph["raymeta.pipeline"]
    assert "raymeta.errors" in graph["raymeta.config"]
    assert len(graph) > 40


def test_no_import_cycle(graph):
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


def test_no_floor_imports_a_higher_one(graph):
    upward = [
        f"{module} (floor {floor_of(module)}) imports {target} (floor {floor_of(target)})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if floor_of(target) > floor_of(module)
    ]
    assert not upward, "\n".join(upward)


LOWER_FLOORS = 4  # errors .. meta: plain PyTorch
ORCHESTRATION = ("ray", "mlflow", "optuna", "pydantic")


def test_the_lower_floors_import_no_orchestration_library():
    found = [
        f"{module_name(path)} imports {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != PACKAGE / "__init__.py" and floor_of(module_name(path)) < LOWER_FLOORS
        for name in sorted(imports_of(path, package_only=False))
        if name.split(".")[0] in ORCHESTRATION
    ]
    assert not found, "\n".join(found)
