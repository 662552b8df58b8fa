"""The docs against the code (issue 22): every ``kvtc-store`` command line in README.md and
docs/ names commands and options the parser has, and every one in a fenced block parses in
full; the README's "Using it" snippet compiles and names what the package exports."""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

from kvtc_store.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
_INLINE = re.compile(r"`((?:\.venv/bin/)?kvtc-store [^`]+)`")


def _subparsers(p: argparse.ArgumentParser) -> dict:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a.choices
    return {}


def fenced_commands() -> list[tuple[str, list[str]]]:
    """``(where, argv)`` of each ``kvtc-store`` line of a fenced block, continuation lines
    joined, shell variables the block sets expanded, comments dropped."""
    out = []
    for doc in DOCS:
        for block in _FENCE.findall(doc.read_text()):
            env: dict[str, str] = {}
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip()
                if re.match(r"[A-Z_]+=", line):  # R=...; E="..."
                    words = shlex.split(line.replace(";", " "), comments=True)
                    env.update(w.split("=", 1) for w in words if "=" in w)
                elif re.match(r"(\.venv/bin/)?kvtc-store ", line):
                    line = re.sub(r"\$([A-Z_]+)", lambda m, env=env: env.get(m.group(1), ""), line)
                    out.append((f"{doc.name}: {line[:60]}", shlex.split(line, comments=True)[1:]))
    return out


def inline_commands() -> list[tuple[str, list[str]]]:
    """``(where, words)`` of each inline ``kvtc-store ...`` code span (synopses: ``[...]``
    optional parts, ``a|b`` alternatives, upper-case placeholders)."""
    out = []
    for doc in DOCS:
        for span in _INLINE.findall(doc.read_text()):
            words = span.replace("[", " ").replace("]", " ").split()[1:]
            out.append((f"{doc.name}: {span}", words))
    return out


FENCED = fenced_commands()


def test_the_docs_hold_command_lines_to_check() -> None:
    assert len(FENCED) >= 15 and len(inline_commands()) >= 10


@pytest.mark.parametrize("where,argv", FENCED, ids=[w for w, _ in FENCED])
def test_each_documented_command_line_parses(where: str, argv: list[str]) -> None:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{where}: the parser refuses it (exit {exc.code})")
    assert callable(args.fn)


@pytest.mark.parametrize("where,words", inline_commands(), ids=[w for w, _ in inline_commands()])
def test_each_inline_command_names_real_commands_and_options(where: str, words: list[str]):
    parser = build_parser()
    for w in words:
        if w.startswith("-"):
            break
        choices = _subparsers(parser)
        if not choices:
            break
        names = w.split("|")
        assert all(n in choices for n in names), f"{where}: no command {w!r}"
        parser = choices[names[0]]
    for w in words:
        if w.startswith("--"):
            opt = w.split("=")[0]
            assert opt in parser._option_string_actions, f"{where}: no option {opt}"


def test_the_using_it_snippet_compiles_and_its_names_exist() -> None:
    """The snippet needs the real model and a default calibration (minutes on a CPU the
    first time), so it is not run here; what it imports and calls must exist."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Using it", 1)[1]
    code = _FENCE.search(section).group(1)
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module.startswith("kvtc_store"):
            mod = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(mod, alias.name), f"{node.module} has no {alias.name}"
    assert "store.close()" in code and "/var/" not in code
    from kvtc_store.store import TieredStore

    called = {
        n.func.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
    }
    called &= {"close", "from_config"}
    assert all(hasattr(TieredStore, c) for c in called)


def runnable_blocks() -> list[tuple[str, str]]:
    """``(where, script)`` of each fenced block marked ``sh runnable`` in docs/."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(r"^```sh runnable\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
            out.append((f"{doc.name}:{text[: m.start()].count(chr(10)) + 1}", m.group(1)))
    return out


@pytest.mark.parametrize("where,script", runnable_blocks(), ids=[w for w, _ in runnable_blocks()])
def test_runnable_blocks_run(where: str, script: str, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{where}:\n{done.stdout}\n{done.stderr}"


@pytest.mark.model
def test_the_using_it_snippet_runs(smollm2, test_settings, tmp_path, monkeypatch, capsys) -> None:
    """The README's "Using it" snippet, run as written, with two substitutions it cannot
    run here without: the suite's SmolLM2 (already loaded) for ``load_model()``, and the
    calibration at the suite's settings (8 windows, no model sampling) for the default
    one (48 windows and the model's samples: about 17 minutes on 2 cores the first time).
    Both are the real functions with other arguments, not stand-ins."""
    import kvtc_store.model as model_mod
    from kvtc_store import calibration
    from kvtc_store.texts import python_docs

    real = calibration.load_or_calibrate
    monkeypatch.setattr(model_mod, "load_model", lambda *a, **k: smollm2)
    monkeypatch.setattr(
        calibration,
        "load_or_calibrate",
        lambda model, tok, info, ratios, *a, **k: real(model, tok, info, ratios, test_settings),
    )
    monkeypatch.setenv("KVTC_STORE_HOME", str(model_mod.cache_home()))  # before HOME moves
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "some-long-document.txt").write_text(
        "\n".join(t for _, t in python_docs("second"))[:3000]
    )
    code = _FENCE.search((ROOT / "README.md").read_text().split("## Using it", 1)[1]).group(1)
    exec(compile(code, "README.md: Using it", "exec"), {})  # noqa: S102 - the README's own code
    reused, ttft, _ = capsys.readouterr().out.split(" ", 2)
    assert int(reused) == 0 and float(ttft) > 0  # a first request: nothing to reuse yet
    stored = list((tmp_path / ".cache" / "kvtc-store" / "my-kv").rglob("*.kvtc"))
    assert len(stored) >= 2  # close() let the queued writes reach the disk tier
