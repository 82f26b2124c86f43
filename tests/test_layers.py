"""The packages' import graph (docs/architecture.md): each package imports only the ones it is allowed to.

Every module's imports are read with ``ast`` (module-level, in-function and ``TYPE_CHECKING`` imports alike) and
checked against :data:`ALLOWED`, which is itself a DAG; nothing imports the command line but the entry point.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from graphlib import TopologicalSorter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Package -> the packages of ours it may import.
ALLOWED: dict[str, set[str]] = {
    "her2_core": set(),
    "dicom_io": {"her2_core"},
    "her2_synthetic": {"her2_core", "dicom_io"},
    "her2_analysis": {"her2_core", "dicom_io"},
    "worker": {"her2_core", "dicom_io", "her2_analysis"},
    "model_training": {"her2_core", "dicom_io", "her2_synthetic", "her2_analysis"},
    "her2_viewer": {"her2_core", "dicom_io"},
    "her2_cli": {"her2_core", "dicom_io", "her2_synthetic", "her2_analysis", "worker", "model_training",
                 "her2_viewer"},
    "benchmarks": {"her2_core", "dicom_io", "her2_synthetic", "her2_analysis", "worker", "model_training"},
}
#: The only modules of the analysis the service imports: what it configures and the one job it runs.
WORKER_USES_OF_ANALYSIS = {"her2_analysis.options", "her2_analysis.pipeline"}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for package in ALLOWED:
        for path in sorted((REPO / package).rglob("*.py")):
            if "node_modules" in path.parts:
                continue
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out.append((".".join(parts), path))
    return out


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement of the file."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}:{node.lineno}: relative import (the project uses absolute ones)"
            found.append((node.module or "", node.lineno))
    return found


def test_every_package_is_found():
    assert {m.split(".")[0] for m, _ in _modules()} == set(ALLOWED)


def test_allowed_graph_is_acyclic():
    order = list(TopologicalSorter(ALLOWED).static_order())
    assert set(order) == set(ALLOWED)


def test_every_import_is_allowed():
    wrong = []
    for module, path in _modules():
        own = module.split(".")[0]
        for imported, line in _imports(path):
            top = imported.split(".")[0]
            if top in ALLOWED and top != own and top not in ALLOWED[own]:
                wrong.append(f"{path.relative_to(REPO)}:{line}: {own} imports {imported}")
    assert not wrong, "imports outside the allowed graph:\n" + "\n".join(wrong)


def test_worker_imports_only_the_analysis_it_calls():
    used = {imported for module, path in _modules() if module.startswith("worker")
            for imported, _ in _imports(path) if imported.startswith("her2_analysis")}
    assert used == WORKER_USES_OF_ANALYSIS


def test_nothing_but_the_entry_point_imports_the_command_line():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"her2": "her2_cli.main:main"}
    outside = [f"{path.relative_to(REPO)}" for module, path in _modules() if not module.startswith("her2_cli")
               for imported, _ in _imports(path) if imported.split(".")[0] == "her2_cli"]
    assert not outside


@pytest.mark.parametrize("module, absent", [
    ("her2_cli.main", ("torch", "benchmarks", "onnxruntime")),
    ("worker.settings", ("torch", "scipy", "skimage", "onnxruntime")),
    ("her2_analysis.pipeline", ("worker", "model_training", "torch", "her2_cli", "pydantic_settings")),
    ("dicom_io.sr", ("worker", "her2_analysis", "model_training")),
    ("her2_synthetic.dicom", ("worker", "her2_analysis", "model_training", "torch")),
    ("her2_core.model_card", ("worker", "dicom_io", "her2_analysis", "model_training")),
])
def test_importing_a_module_loads_nothing_it_does_not_need(module, absent):
    code = (f"import sys, {module}; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(absent)!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing {module} loads {out.stdout.strip()}"


def test_training_commands_are_listed_and_parse_their_options(capsys):
    """``her2 --help`` lists the training commands; each one parses its own options (same usage and errors)."""
    from her2_cli.main import build_parser, main
    from her2_cli.training import TRAINING_COMMANDS

    listed = build_parser().format_help()
    assert all(name in listed for name in TRAINING_COMMANDS)
    with pytest.raises(SystemExit) as exit_:
        main(["export"])
    assert exit_.value.code == 2
    assert "her2 export: error: the following arguments are required: checkpoint, --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["config", "--no-such-option"])
    assert "her2: error: unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_every_installed_package_is_packaged_and_copied_into_the_image():
    """A new package must reach the wheel (pyproject include) and the container image (deploy/Dockerfile)."""
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    installed = {pattern.rstrip("*") for pattern in include}
    assert installed == set(ALLOWED) - {"benchmarks"}
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert all(f"COPY {package} ./{package}\n" in dockerfile for package in installed)
