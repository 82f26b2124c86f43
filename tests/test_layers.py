"""The packages' layers (docs/architecture.md): no import runs upward.

her2_core <- dicom_io <- her2_synthetic <- worker <- model_training <- benchmarks: a module may import its own
package and the packages below it, never one above. Every module's imports are read with ``ast`` (module-level,
in-function and ``TYPE_CHECKING`` imports alike); an upward import is allowed only inside a function and
only where :data:`ALLOWED_IN_FUNCTION` names it with its reason.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Our packages, lowest first.
LAYERS = ("her2_core", "dicom_io", "her2_synthetic", "worker", "model_training", "benchmarks")
RANK = {name: i for i, name in enumerate(LAYERS)}

#: (importing module, imported package) -> why an upward import inside a function is allowed there.
ALLOWED_IN_FUNCTION = {
    ("worker.cli", "model_training"): "the training commands, imported only when one of them runs "
    "(run_training_command)",
}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for package in LAYERS:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out.append((".".join(parts), path))
    return out


def _imports(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import statement of the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                assert not child.level, f"{path}:{child.lineno}: relative import (the project uses absolute ones)"
                name = child.module or ""
                found.append((name, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def test_every_package_is_found():
    modules = {m.split(".")[0] for m, _ in _modules()}
    assert modules == set(LAYERS)


def test_no_import_runs_upward():
    upward = []
    for module, path in _modules():
        own = module.split(".")[0]
        for imported, line, in_function in _imports(module, path):
            top = imported.split(".")[0]
            if top not in RANK or RANK[top] <= RANK[own]:
                continue
            if in_function and (module, top) in ALLOWED_IN_FUNCTION:
                continue
            where = "in a function" if in_function else "at module level"
            upward.append(f"{path.relative_to(REPO)}:{line}: {own} imports {imported} ({where})")
    assert not upward, "imports that run upward between packages:\n" + "\n".join(upward)


def test_allowed_upward_imports_are_still_needed():
    """Each allowance names an import that exists (a stale one would hide a future real one)."""
    used = set()
    for module, path in _modules():
        for imported, _, in_function in _imports(module, path):
            if in_function:
                used.add((module, imported.split(".")[0]))
    assert set(ALLOWED_IN_FUNCTION) <= used


@pytest.mark.parametrize("module, absent", [
    ("worker.cli", ("model_training", "torch", "benchmarks")),
    ("worker.pipeline", ("model_training", "torch", "benchmarks")),
    ("dicom_io.sr", ("worker", "model_training")),
    ("her2_synthetic.dicom", ("worker", "model_training", "torch")),
    ("her2_core.model_card", ("worker", "dicom_io", "model_training")),
])
def test_importing_a_layer_loads_nothing_above_it(module, absent):
    code = (f"import sys, {module}; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(absent)!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing {module} loads {out.stdout.strip()}"


def test_training_commands_are_listed_without_training_code_and_parsed_by_it(capsys):
    """``her2 --help`` lists the training commands from worker.cli's table; each one's options come from
    model_training.cli's parser, imported when the command runs (same help, usage and errors as before)."""
    from model_training import cli as training_cli
    from worker.cli import TRAINING_COMMANDS, build_parser, main

    listed = build_parser().format_help()
    assert all(name in listed for name in TRAINING_COMMANDS)
    with pytest.raises(SystemExit) as exit_:
        main(["export"])
    assert exit_.value.code == 2
    assert "her2 export: error: the following arguments are required: checkpoint, --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["config", "--no-such-option"])
    assert "her2: error: unrecognized arguments: --no-such-option" in capsys.readouterr().err
    assert training_cli.TRAINING_COMMANDS is TRAINING_COMMANDS


def test_every_installed_package_is_packaged_and_copied_into_the_image():
    """A new layer must reach the wheel (pyproject include) and the container image (deploy/Dockerfile)."""
    import tomllib

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    installed = {pattern.rstrip("*") for pattern in include}
    assert installed == set(LAYERS) - {"benchmarks"}
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert all(f"COPY {package} ./{package}\n" in dockerfile for package in installed)
