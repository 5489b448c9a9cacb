"""The layering the design promises, read from the source with ``ast``: nothing in quant
imports bench, bench does not import the app layer, the core (``enginekit/*.py``) imports
no stage, and no module grows past what one can read in a sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Source folder -> the import name it installs as.
PACKAGES = {"enginekit": "enginekit", "export": "enginekit.export", "quant": "enginekit.quant",
            "runtimes": "enginekit.runtimes", "bench": "enginekit.bench", "serve": "enginekit.serve"}
STAGES = ("enginekit.export", "enginekit.quant", "enginekit.runtimes", "enginekit.bench", "enginekit.serve",
          "enginekit.app")
MAX_LINES = 500
#: Modules over MAX_LINES today, each being split by its owner; remove a line when it is done.
TOO_LONG_TODAY = {
}


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (lazy imports in functions count)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _offences(folder: str, banned: tuple[str, ...], only_top: bool = False) -> list[str]:
    paths = [p for p in _modules(folder) if not only_top or p.parent == ROOT / folder]
    return [f"{p.relative_to(ROOT)} imports {name}" for p in paths for name in sorted(_imports(p))
            if any(name == b or name.startswith(b + ".") for b in banned)]


def test_quant_does_not_import_bench() -> None:
    assert _offences("quant", ("enginekit.bench",)) == []


def test_bench_does_not_import_the_app_layer() -> None:
    assert _offences("bench", ("enginekit.app",)) == []


def test_the_core_imports_no_stage() -> None:
    # The core routes to stages through the registry's "module:attr" strings, imported on use.
    assert _offences("enginekit", STAGES, only_top=True) == []


def test_measurement_scripts_are_not_in_the_installed_package() -> None:
    scripts = [p.relative_to(ROOT).as_posix() for folder in PACKAGES for p in _modules(folder)
               if "argparse" in _imports(p) and p.name != "session.py"]
    assert scripts == []


@pytest.mark.parametrize("folder", [*PACKAGES, "benchmarks"])
def test_no_module_is_longer_than_one_sitting(folder: str) -> None:
    long = {p.relative_to(ROOT).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
            for p in _modules(folder)}
    over = {name: n for name, n in long.items() if n > MAX_LINES and name not in TOO_LONG_TODAY}
    assert over == {}, f"modules over {MAX_LINES} lines: {over}"


def test_the_exceptions_list_stays_true() -> None:
    # A module split below the limit leaves the list: the exceptions only shrink.
    fixed = [name for name in TOO_LONG_TODAY if (ROOT / name).is_file()
             and len((ROOT / name).read_text(encoding="utf-8").splitlines()) <= MAX_LINES]
    assert fixed == []


#: Names a module outside ``runtimes/`` may not compare a value with: the backends'
#: (and TensorRT, a quantization target named like one). The core asks the backend instead
#: (``enginekit.registry.backend_class(name).static_shapes`` and the like).
BACKEND_NAMES = frozenset({"onnxruntime", "openvino", "tensorrt"})
#: Modules that still compare, each being restructured by its owner; remove a line when done.
COMPARES_BACKEND_NAMES_TODAY = {
    "quant/diffusion.py": "the per-backend pipeline quantizer, being split into one module per backend",
    "quant/diffusion_components.py": "the per-backend component recipes of the pipeline quantizer (same split)",
    "enginekit/app/optimize_plan.py": "optimize's candidate table (which backends to try), being reworked with its logic",
    "enginekit/app/optimize_pipeline_plan.py": "optimize's pipeline candidates per backend (same rework)",
    "enginekit/app/optimize_pipeline.py": "optimize's pipeline candidates, being reworked with optimize's logic",
}


def _backend_name_comparisons(path: Path) -> list[str]:
    """``x == "openvino"``, ``x != "onnxruntime"``, ``x in ("openvino", ...)``: line and text of each."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

    def names(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in BACKEND_NAMES
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(isinstance(e, ast.Constant) and e.value in BACKEND_NAMES for e in node.elts)
        return False

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(names(n) for n in (node.left, *node.comparators)):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.MatchValue) and names(node.value):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: case {ast.unparse(node.value)}")
    return found


def test_the_registered_backends_are_the_names_checked() -> None:
    from enginekit.registry import backend_names

    assert set(backend_names()) - {"fake"} <= BACKEND_NAMES


def test_only_runtimes_compare_backend_names() -> None:
    # Backend knowledge (thread settings, file kinds, static shapes) lives in runtimes/: the
    # rest of the library asks the backend class, so a backend registered at run time answers
    # the same questions. Measurement scripts (benchmarks/) measure named backends on purpose.
    found = [hit for folder in PACKAGES if folder != "runtimes" for p in _modules(folder)
             if p.relative_to(ROOT).as_posix() not in COMPARES_BACKEND_NAMES_TODAY
             for hit in _backend_name_comparisons(p)]
    assert found == []


def test_the_backend_name_exceptions_stay_true() -> None:
    fixed = [name for name in COMPARES_BACKEND_NAMES_TODAY if not _backend_name_comparisons(ROOT / name)]
    assert fixed == []
