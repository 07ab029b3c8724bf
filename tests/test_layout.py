"""The house rules of the code's layout, read from the code itself (in process, nothing started).

Gateways and workers meet only in Redis, through the project's common package: ``gateway/`` and ``worker/``
never import each other, ``shared/`` imports neither, and none of the three imports the command that starts
them (``tokenspool``'s own modules). All three install under the project's name (``tokenspool.gateway``,
...), so nothing imports a top-level ``gateway``, ``worker`` or ``shared`` that another project's module of
that name could shadow."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ("gateway", "worker", "shared")
MAY_IMPORT = {"gateway": {"gateway", "shared"}, "worker": {"worker", "shared"}, "shared": {"shared"}}


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in a file."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py") if "node_modules" not in p.parts)


@pytest.mark.parametrize("component", COMPONENTS)
def test_a_component_imports_only_itself_and_the_common_package(component: str) -> None:
    wrong = []
    for path in python_files(component):
        for line, module in imported_modules(path):
            parts = module.split(".")
            if parts[0] == "tokenspool" and (len(parts) < 2 or parts[1] not in MAY_IMPORT[component]):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_nothing_imports_the_components_by_a_top_level_name_another_project_could_shadow() -> None:
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in python_files(*COMPONENTS, "tokenspool", "tests", "scripts")
        for line, module in imported_modules(path)
        if module.split(".")[0] in COMPONENTS
    ]
    assert not wrong, "\n".join(wrong)


def test_the_components_are_the_top_level_folders_installed_under_the_project_name() -> None:
    # tokenspool/gateway etc. are links to the top-level folders: one copy of the code, two ways to browse it
    for component in COMPONENTS:
        installed = ROOT / "tokenspool" / component
        assert installed.is_symlink() and installed.resolve() == (ROOT / component).resolve()
