"""The user's own calibration data: text files and token-id files, cut into windows.

``kvtc-store calibrate --data PATH`` reads, in the order given (a folder's files sorted
by path, recursively):

- text: ``.txt`` and ``.md`` files, UTF-8, each tokenized with the model's tokenizer as
  one document;
- token ids: ``.jsonl`` files, one document per line, either ``{"input_ids": [...]}`` or
  a plain JSON list of ints; ``.npy`` files holding an integer array (1-D: one document;
  2-D: one per row), read without pickle.

The documents are joined end to end into one stream and the calibration windows are cut
from it at evenly spaced offsets, so windows cover all the data; the last window is the
held-out one. Sequence packing of this kind is how LLMs are pre-trained, and a window
that spans two documents still has each token's KV as the model caches it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from .errors import CalibrationDataError

TEXT_SUFFIXES = (".txt", ".md")
TOKEN_SUFFIXES = (".jsonl", ".npy")
DATA_SUFFIXES = TEXT_SUFFIXES + TOKEN_SUFFIXES


def data_files(paths: list[str | os.PathLike]) -> list[Path]:
    """The data files ``paths`` name, checked to exist and be of a known kind; nothing is
    read. A folder stands for its ``.txt``/``.md``/``.jsonl``/``.npy`` files (recursive,
    sorted by path).

    Raises:
        CalibrationDataError: no path given, a path that does not exist, a file of
            another kind, or a folder with no data files.
    """
    if not paths:
        raise CalibrationDataError("no calibration data given")
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _kind(f))
            if not found:
                raise CalibrationDataError(f"{p} holds no data files ({', '.join(DATA_SUFFIXES)})")
            out += found
        elif p.is_file():
            if not _kind(p):
                raise CalibrationDataError(
                    f"{p}: unknown kind of data file (use {', '.join(DATA_SUFFIXES)})"
                )
            out.append(p)
        else:
            raise CalibrationDataError(f"{p}: no such file or folder")
    return out


def needs_tokenizer(paths: list[str | os.PathLike]) -> bool:
    """Whether any of the data files ``paths`` name (see :func:`data_files`) is text, which
    only the model's tokenizer turns into token ids; token-id files (``.jsonl``,
    ``.npy``) can be read, and their length checked, before the model loads.

    Raises:
        CalibrationDataError: as :func:`data_files`.
    """
    return any(_kind(f) == "text" for f in data_files(paths))


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    return "ids" if suffix in TOKEN_SUFFIXES else None


def read_token_ids(
    paths: list[str | os.PathLike], tokenizer=None, vocab_size: int | None = None
) -> torch.Tensor:
    """Token ids of the calibration data ``paths`` name, documents joined in order.

    Args:
        paths: files or folders (see :func:`data_files`).
        tokenizer: the model's tokenizer (a transformers tokenizer; needed for text files
            only, None otherwise).
        vocab_size: ids must lie in ``[0, vocab_size)`` (None: not checked).

    Returns:
        int64 ``(n,)``.

    Raises:
        CalibrationDataError: a missing, empty, malformed or unknown file, text without a
            tokenizer, or a token id outside the vocabulary; the message names the file
            (and the line of a ``.jsonl`` file).
    """
    parts: list[np.ndarray] = []
    for f in data_files(paths):
        if _kind(f) == "text":
            ids = _read_text(f, tokenizer)
        elif f.suffix.lower() == ".npy":
            ids = _read_npy(f)
        else:
            ids = _read_jsonl(f)
        if ids.size == 0:
            raise CalibrationDataError(f"{f} holds no tokens")
        if vocab_size is not None and (ids.min() < 0 or ids.max() >= vocab_size):
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise CalibrationDataError(
                f"{f}: token id {bad} is outside the model's vocabulary [0, {vocab_size})"
            )
        parts.append(ids)
    return torch.from_numpy(np.concatenate(parts).astype(np.int64))


def _read_text(f: Path, tokenizer) -> np.ndarray:
    if tokenizer is None:
        raise CalibrationDataError(
            f"{f}: text data needs the model's tokenizer, and the model has none "
            "(give token ids: .jsonl or .npy)"
        )
    try:
        text = f.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationDataError(f"{f}: not UTF-8 text ({exc.reason})") from exc
    if not text.strip():
        return np.zeros(0, dtype=np.int64)
    return np.asarray(tokenizer(text).input_ids, dtype=np.int64)


def _read_npy(f: Path) -> np.ndarray:
    try:
        arr = np.load(f, allow_pickle=False)
    except ValueError as exc:
        raise CalibrationDataError(f"{f}: not a .npy array without pickles: {exc}") from exc
    if not np.issubdtype(arr.dtype, np.integer) or arr.ndim not in (1, 2):
        raise CalibrationDataError(
            f"{f}: expected a 1-D or 2-D integer array of token ids, got {arr.ndim}-D {arr.dtype}"
        )
    return arr.reshape(-1).astype(np.int64)


def jsonl_token_ids(f: str | os.PathLike) -> list[list[int]]:
    """The documents of a JSON-lines file of token ids, one a line: a list of ints, or
    ``{"input_ids": [...]}``; blank lines skipped.

    Raises:
        CalibrationDataError: a line that is not JSON or not such a list (named by its
            number).
    """
    docs: list[list[int]] = []
    with open(f, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationDataError(f"{f} line {n}: not JSON ({exc.msg})") from exc
            ids = row.get("input_ids") if isinstance(row, dict) else row
            if not isinstance(ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids
            ):
                raise CalibrationDataError(
                    f'{f} line {n}: expected {{"input_ids": [int, ...]}} or a list of ints'
                )
            docs.append(ids)
    return docs


def _read_jsonl(f: Path) -> np.ndarray:
    return np.asarray([t for d in jsonl_token_ids(f) for t in d], dtype=np.int64)


def cut_windows(ids: torch.Tensor, windows: int, window_tokens: int) -> torch.Tensor:
    """``windows`` calibration windows and one held-out window of ``window_tokens``
    tokens each, at evenly spaced offsets over ``ids``, joined: int64
    ``((windows + 1) * window_tokens,)``.

    Raises:
        CalibrationDataError: ``ids`` is shorter than ``(windows + 1) * window_tokens``
            (the message says how many tokens are needed), or no window is asked.
    """
    if windows < 1 or window_tokens < 1:
        raise CalibrationDataError(f"need at least one window of one token, not {windows}")
    n, need = int(ids.numel()), (windows + 1) * window_tokens
    if n < need:
        raise CalibrationDataError(
            f"the calibration data hold {n:,} tokens; {windows} windows of {window_tokens:,} "
            f"tokens plus one held-out window need {need:,}: add data, or ask for fewer "
            "windows (--windows) or shorter ones (--window-tokens)"
        )
    stride = (n - window_tokens) // windows
    return torch.cat([ids[i * stride : i * stride + window_tokens] for i in range(windows + 1)])


def data_corpus_name(ids: torch.Tensor) -> str:
    """The ``corpus`` setting that names user data: ``"data:"`` and a hash of the ids,
    so the cached PCA fit of one data set is never taken for another's."""
    digest = hashlib.sha256(ids.numpy().astype("<u4").tobytes()).hexdigest()[:16]
    return f"data:{digest}"
