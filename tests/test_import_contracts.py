"""The import contracts of pyproject.toml ([tool.importlinter]) hold, and import-linter
sees the mapped sub-packages (a planted forbidden import breaks a contract)."""

from __future__ import annotations

import importlib.util

import pytest

from tests import lint_imports

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("importlinter") is None, reason="import-linter not installed"
)


def test_every_import_contract_is_kept() -> None:
    done = lint_imports.run()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout
    assert "Analyzed" in done.stdout


@pytest.mark.parametrize(
    ("where", "line", "contract"),
    [
        ("codec/codec.py", "from .gpu import codec_gpu", "import nothing from each other"),
        ("backends/memory.py", "from ..codec import format", "backends know only"),
        ("codec/layout.py", "from .. import store", "connectors and ray_jobs -> store"),
        ("store.py", "from .connectors import engine", "connectors and ray_jobs -> store"),
    ],
)
def test_a_planted_import_breaks_its_contract(where: str, line: str, contract: str) -> None:
    done = lint_imports.run(extra={where: line})
    assert done.returncode != 0
    broken = [ln for ln in done.stdout.splitlines() if ln.endswith("BROKEN")]
    assert any(contract in ln for ln in broken), done.stdout
