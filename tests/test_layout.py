"""The package layout holds: cloud and device packages never import each other.

Shared contracts (``streams.candidates``, the envelope in ``device_rerank``) sit below or on
one side; a cycle would make either side impossible to ship or test alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_packages(package: str) -> set[str]:
    """Top-level packages that any module of ``package`` imports (at any depth, lazily or not)."""
    out: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize(("package", "forbidden"), [("cloud_recsys", {"device_rerank", "tandem"}), ("device_rerank", {"cloud_recsys", "tandem"}), ("streams", {"cloud_recsys", "device_rerank", "tandem"})])
def test_lower_packages_do_not_import_upward_or_sideways(package: str, forbidden: set[str]) -> None:
    assert not imported_packages(package) & forbidden
