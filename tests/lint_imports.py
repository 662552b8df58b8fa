"""Run import-linter's contracts (``[tool.importlinter]`` in pyproject.toml) on the whole
distribution: ``python tests/lint_imports.py`` (``make lint`` runs it; so does
``tests/test_import_contracts.py``).

``kvtc_store.backends``, ``.connectors`` and ``.ray_jobs`` live at the top of the
repository and are mapped under ``kvtc_store`` by setuptools' ``package-dir``; grimp (the
graph builder under import-linter) walks one folder per root package, so it would not see
them. This script lays the distribution out as it is installed, in a temporary folder of
symbolic links, and runs ``lint-imports`` with that folder first on ``PYTHONPATH``.
Exit status: lint-imports' own (0: every contract kept).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"backends": "backends", "connectors": "connectors", "ray_jobs": "ray_jobs"}


def _link_sources(src: Path, dst: Path) -> None:
    """Folders of ``src`` re-made under ``dst``, each ``.py`` file a link to its source
    (grimp does not walk into linked folders)."""
    for path in src.rglob("*.py"):
        if "__pycache__" in path.parts:
            continue
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path)


def installed_tree(into: Path, extra: dict[str, str] | None = None) -> Path:
    """``into/kvtc_store``: ``kvtc_store/`` plus the mapped sub-packages, nested as the
    installed distribution nests them; ``extra`` maps a file (relative to the installed
    package) to lines appended to a copy of it (a test plants a forbidden import so)."""
    pkg = into / "kvtc_store"
    _link_sources(ROOT / "kvtc_store", pkg)
    for name, folder in MAPPED.items():
        _link_sources(ROOT / folder, pkg / name)
    for rel, lines in (extra or {}).items():
        path = pkg / rel
        text = path.read_text()
        path.unlink()
        path.write_text(text + "\n" + lines + "\n")
    return pkg


def run(
    extra_args: list[str] | None = None, extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run lint-imports over the installed layout (``extra``: as for
    :func:`installed_tree`); its completed process (output captured as text)."""
    scripts = Path(sysconfig.get_path("scripts"))
    exe = scripts / "lint-imports"
    if not exe.exists():
        exe = Path(sys.executable).parent / "lint-imports"
    with tempfile.TemporaryDirectory(prefix="kvtc-imports-") as tmp:
        installed_tree(Path(tmp), extra)
        env = {**os.environ, "PYTHONPATH": tmp, "PYTHONDONTWRITEBYTECODE": "1"}
        return subprocess.run(
            [str(exe), str(ROOT / "pyproject.toml"), "--no-cache",
             *(extra_args or [])],
            check=False, cwd=tmp, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip


if __name__ == "__main__":
    done = run(sys.argv[1:])
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    sys.exit(done.returncode)
