"""Each service (and the client library) imports only itself and services.common, so that
the router, the store and the workers can be deployed, read and changed apart. What they share
(record formats, errors, helpers) lives in services/common; the whole stack is assembled only
outside services/, in demo/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parent.parent / "services"
ALLOWED = {
    "router": {"router", "common"},
    "gpu_worker": {"gpu_worker", "common"},
    "adapter_store": {"adapter_store", "common"},
    "client": {"client", "common"},
    "openai_front": {"openai_front", "common"},
    "common": {"common"},
}


def imported_services(path: Path) -> set[str]:
    """Names of the services.<name> packages that a module imports, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "services" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_service_package_is_covered():
    packages = {p.name for p in SERVICES.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(ALLOWED)


@pytest.mark.parametrize("service", sorted(ALLOWED))
def test_a_service_imports_only_itself_and_common(service):
    wrong = {
        str(path.relative_to(SERVICES.parent)): sorted(imported_services(path) - ALLOWED[service])
        for path in sorted((SERVICES / service).rglob("*.py"))
    }
    assert {path: names for path, names in wrong.items() if names} == {}
