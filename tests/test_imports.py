"""The wing rules, read from the source: training (study/) never imports the analysis; the
analysis never imports torch or Ray and reaches study/ only through the schema module
(study/results.py) and its per-epoch part files (study/epoch_parts.py, which the analysis reads
and its synthetic studies write); common/ is the standard library only; no two modules import each other,
directly or around a circle.

``python tests/test_imports.py`` prints the import graph between the project's modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("study", "analysis", "common")
#: The analysis' doors into study/: the schema and its per-epoch part files.
SCHEMA = ("study.results", "study.epoch_parts")
#: The schema module and the registry it re-exports are read by the analysis: no torch, no Ray.
TORCH_FREE = ("study.results", "study.epoch_parts", "study.variants", "study.storage")


def module_files() -> dict[str, Path]:
    """Every module of the three packages, by dotted name (``__init__`` files left out)."""
    return {f"{pkg}.{path.stem}": path
            for pkg in PACKAGES for path in sorted((ROOT / pkg).glob("*.py"))
            if path.stem != "__init__"}


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (a function's lazy import counts)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # ``from study import results`` imports the module study.results
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports."""
    files = module_files()
    return {name: {m for m in imports_of(path) if m in files and m != name}
            for name, path in files.items()}


def third_party(name: str) -> set[str]:
    """The top-level names of what module ``name`` imports from outside the project."""
    tops = {m.split(".")[0] for m in imports_of(module_files()[name])}
    return tops - set(PACKAGES)


def test_training_never_imports_the_analysis():
    graph = import_graph()
    bad = {m: sorted(d for d in deps if d.startswith("analysis.")) for m, deps in graph.items()
           if m.startswith("study.")}
    assert not {m: d for m, d in bad.items() if d}, bad


def test_the_analysis_reaches_study_only_through_the_schema_modules():
    graph = import_graph()
    doors = {m: sorted(d for d in deps if d.startswith("study.") and d not in SCHEMA)
             for m, deps in graph.items() if m.startswith("analysis.")}
    assert not {m: d for m, d in doors.items() if d}, doors


def test_the_analysis_and_the_schema_import_neither_torch_nor_ray():
    for name in module_files():
        if name.startswith("analysis.") or name in TORCH_FREE:
            assert not third_party(name) & {"torch", "torchvision", "ray"}, name


def test_common_imports_only_the_standard_library():
    for name in module_files():
        if name.startswith("common."):
            assert third_party(name) <= set(sys.stdlib_module_names), (name, third_party(name))
            assert not import_graph()[name], name


def test_no_import_circles():
    graph = import_graph()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for dep in graph[start]:
            if dep == goal or (dep not in seen and reaches(dep, goal, seen | {dep})):
                return True
        return False

    circles = sorted(m for m in graph if reaches(m, m, {m}))
    assert not circles, f"modules on an import circle: {circles}"


def test_the_rules_catch_what_they_forbid(tmp_path):
    """The reader itself: a lazy import inside a function and ``from pkg import mod`` count."""
    source = tmp_path / "m.py"
    source.write_text("from study import config\n\ndef f():\n    import torch.nn\n")
    assert {"study.config", "torch.nn"} <= imports_of(source)


def test_the_sweep_cli_loads_without_torch():
    """The driver never trains: `--help`, a dry run and a refused flag answer without torch's
    two-second import (a running study's driver still loads it, with the trainable and Tune's
    TensorBoard logger)."""
    code = "import sys, study.sweep; print(sorted({'torch', 'torchvision'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


if __name__ == "__main__":
    for module, deps in import_graph().items():
        print(f"{module:<26} -> {', '.join(sorted(deps)) or '(none)'}")

