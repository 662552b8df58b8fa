"""Suite (b): RULER-style retrieval from real-text haystacks.

Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language Models?",
arXiv 2404.06654, §3 (needle-in-a-haystack tasks). Two tasks, each at several lengths with
the needle depth swept:

- ``passkey``: one needle "The pass key is 71432. Remember it. 71432 is the pass key."
  (the passkey task of Mohtashami & Jaggi, arXiv 2305.16300); the answer is the number.
- ``multikey``: three needles "The magic number for {word} is {5 digits}." with distinct
  words (RULER's MK-NIAH); the question names one of them, whose depth is the swept one;
  the two distractors sit at seeded random depths. RULER's wording ("One of the special
  magic numbers for ... is: ...", 7 digits, 4 needles) left the uncompressed 135M model
  at 50%/40%/30% at 2k/4k/8k tokens on the H200 (20 prompts each); this wording and size
  scored 90%/95%/45%, so 2k and 4k can qualify.

The haystack is held-out real text of one genre (the filler genre is a dimension: each
(genre, task, length) is a group of its own; :mod:`.genres`). A prompt of nominal length ``N`` is built at the token level in the model's
chat format: the *stored* part (chat header, instruction, haystack with needles) is exactly
``N - 256`` tokens, a whole number of 256-token chunks, and is what each method
round-trips; the question and the start of the answer follow (under 256 tokens) and are
prefilled on top of the decoded KV, as a store would serve a cached document and a new
question. Up to 12 tokens are decoded greedily; a sample is correct when the first number
in them is the needle's value. Seeds are fixed per (genre, task, length, sample).
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field

import torch

from .accounting import ByteCount, roundtrip_counted
from .base import CHUNK_TOKENS, KVMethod
from .data import token_ids
from .engine import Runner

TASKS = ("passkey", "multikey")
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
ANSWER_TOKENS = 12
MULTIKEY_NEEDLES = 3
WORDS = (
    "apple",
    "river",
    "castle",
    "garden",
    "silver",
    "winter",
    "pencil",
    "violin",
    "dragon",
    "harbor",
    "meadow",
    "rocket",
    "candle",
    "forest",
    "island",
    "marble",
    "orange",
    "pepper",
    "planet",
    "rabbit",
    "saddle",
    "summer",
    "temple",
    "tiger",
    "tunnel",
    "velvet",
    "wagon",
    "window",
    "anchor",
    "basket",
    "bridge",
    "cactus",
    "copper",
    "falcon",
    "ginger",
    "helmet",
    "jungle",
    "lantern",
    "mirror",
    "piano",
)

_PASSKEY_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n\n"
)
MULTIKEY_INTRO = (
    "Some special magic numbers are hidden inside the following text. Make sure to "
    "memorize them. I will quiz you about one of them.\n\n"
)
MULTIKEY_NEEDLE = "\nThe magic number for {key} is {value}.\n"
MULTIKEY_QUESTION = "What is the magic number for {key}?"
MULTIKEY_ANSWER = "The magic number for {key} is"
MULTIKEY_DIGITS = 5


@dataclass
class Sample:
    """One retrieval prompt.

    Attributes:
        stored: token ids ``(N - 256,)`` of the stored part (round-tripped by each method).
        suffix: token ids ``(m,)`` of the question and answer prefix (prefilled fresh).
        answer: the needle's value, digits.
    """

    task: str
    length: int
    index: int
    depth: float
    genre: str
    stored: torch.Tensor
    suffix: torch.Tensor
    answer: str


def _chat_parts(tok) -> tuple[str, str]:
    """The chat template around one user message: ``(head, tail)``, tail ending where the
    assistant's answer starts."""
    marker = "\x00MSG\x00"
    s = tok.apply_chat_template(
        [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
    )
    head, tail = s.split(marker)
    return head, tail


def _snap(tok, filler: list[int], pos: int) -> int:
    """The first position at or after ``pos`` (within 64 tokens) that follows a line break,
    so a needle starts on its own line; ``pos`` itself when there is none."""
    for p in range(pos, min(pos + 64, len(filler))):
        if p > 0 and "\n" in tok.decode(filler[p - 1 : p]):
            return p
    return pos


def build_sample(tok, task: str, length: int, index: int, genre: str) -> Sample:
    """The ``index``-th sample of a task at nominal length ``length`` (a multiple of 256,
    at least 512) with a haystack of ``genre``'s text. Deterministic: seeded by
    ``(genre, task, length, index)``.

    Raises:
        ValueError: unknown task, or a length too short for the prompt.
    """
    if task not in TASKS:
        raise ValueError(f"unknown retrieval task {task!r}; known: {TASKS}")
    rng = random.Random(f"{genre}-{task}-{length}-{index}")
    depth = DEPTHS[index % len(DEPTHS)]
    head, tail = _chat_parts(tok)
    words = [w for w in WORDS if len(tok(" " + w).input_ids) == 1]
    if task == "passkey":
        value = str(rng.randint(10000, 99999))
        intro = _PASSKEY_INTRO
        needles = [(depth, f"\nThe pass key is {value}. Remember it. {value} is the pass key.\n")]
        question = "What is the pass key? Answer with the number only."
        answer_prefix = "The pass key is"
    else:
        keys = rng.sample(words, MULTIKEY_NEEDLES)
        lo = 10 ** (MULTIKEY_DIGITS - 1)
        values = [str(rng.randint(lo, 10 * lo - 1)) for _ in keys]
        value, key = values[0], keys[0]
        intro = MULTIKEY_INTRO
        needles = [(depth, MULTIKEY_NEEDLE.format(key=key, value=value))]
        for k, v in zip(keys[1:], values[1:]):
            needles.append((rng.uniform(0.05, 0.95), MULTIKEY_NEEDLE.format(key=k, value=v)))
        question = MULTIKEY_QUESTION.format(key=key)
        answer_prefix = MULTIKEY_ANSWER.format(key=key)
    stored_len = length - CHUNK_TOKENS
    prefix = tok(head + intro).input_ids
    needle_ids = [(d, tok(n).input_ids) for d, n in sorted(needles)]
    n_filler = stored_len - len(prefix) - sum(len(ids) for _, ids in needle_ids)
    if n_filler < 64:
        raise ValueError(f"length {length} is too short for a {task} prompt")
    source = token_ids(tok, genre)
    start = rng.randrange(0, source.numel() - n_filler)
    filler = source[start : start + n_filler].tolist()
    body, cut = [], 0
    for d, ids in needle_ids:
        at = max(cut, _snap(tok, filler, int(d * n_filler)))
        body += filler[cut:at] + ids
        cut = at
    body += filler[cut:]
    stored = torch.tensor(prefix + body)
    suffix = torch.tensor(tok("\n\n" + question + tail + answer_prefix).input_ids)
    assert stored.numel() == stored_len, (stored.numel(), stored_len)
    return Sample(task, length, index, depth, genre, stored, suffix, value)


def is_correct(tok, tokens: list[int], answer: str) -> bool:
    """Whether the first number in the decoded ``tokens`` is ``answer``."""
    found = re.findall(r"\d+", tok.decode(tokens))
    return bool(found) and found[0] == answer


@dataclass
class GroupResult:
    """Correct answers of one method on one (task, length) group; ``wrong`` lists the
    sample indices answered wrongly (to tell prompts the uncompressed model barely gets
    from systematic losses)."""

    correct: int = 0
    total: int = 0
    wrong: list[int] = field(default_factory=list)
    bytes: ByteCount = field(default_factory=ByteCount)
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)


class RetrievalGroup:
    """The samples of one (task, length), their exact KV, and one :meth:`run` per method.

    Args:
        runner: the model.
        tok: its tokenizer.
        task, length, genre: see :func:`build_sample`.
        samples: how many (depths cycle through :data:`DEPTHS`).
        batch: prompts per forward.
        workers: prompts round-tripped at once (threads; see :func:`.base.roundtrip_many`).
        first: index of the first sample (samples ``first .. first + samples - 1``).
    """

    def __init__(
        self,
        runner: Runner,
        tok,
        task: str,
        length: int,
        samples: int,
        batch: int,
        workers: int = 1,
        first: int = 0,
        genre: str = "encyclopedic",
    ):
        self.runner, self.tok, self.batch, self.workers = runner, tok, batch, workers
        self.task, self.length, self.genre = task, length, genre
        self.samples = [
            build_sample(tok, task, length, i, genre) for i in range(first, first + samples)
        ]
        self.exact = []
        for rows in self._batches(by_suffix=False):
            self.exact += runner.prefill(torch.stack([self.samples[i].stored for i in rows]))

    @property
    def key(self) -> str:
        """``task@length`` (the genre is the row's)."""
        return f"{self.task}@{self.length}"

    def _batches(self, by_suffix: bool = True) -> list[list[int]]:
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(self.samples):
            groups.setdefault(s.suffix.numel() if by_suffix else 0, []).append(i)
        out = []
        for rows in groups.values():
            out += [rows[j : j + self.batch] for j in range(0, len(rows), self.batch)]
        return out

    def run(self, method: KVMethod | None) -> GroupResult:
        """Answer every sample from ``method``'s round trip (None: from the exact KV)."""
        t0 = time.time()
        res = GroupResult()
        for rows in self._batches():
            kvs = [self.exact[i] for i in rows]
            kvs = roundtrip_counted(method, kvs, res.bytes, self.workers)
            suffix = torch.stack([self.samples[i].suffix for i in rows])
            out = self.runner.greedy(kvs, suffix, ANSWER_TOKENS).cpu()
            for j, i in enumerate(rows):
                ok = is_correct(self.tok, out[j].tolist(), self.samples[i].answer)
                res.correct += ok
                res.total += 1
                if not ok:
                    res.wrong.append(self.samples[i].index)
        res.seconds = time.time() - t0
        return res
