"""The page-hash -> token-ids map behind the SGLang connector (no SGLang needed: the map
is fed by hand here as SGLang's hash function feeds it; test_sglang_storage.py feeds it
through SGLang's real function)."""

from __future__ import annotations

import numpy as np

from kvtc_store.connectors.sglang_pages import PageTokenMap


def _page(*ids: int) -> bytes:
    return np.asarray(ids, dtype="<u4").tobytes()


def _chain_of(m: PageTokenMap, names: str, size: int = 2) -> None:
    """Pages named by letters, each a child of the previous, token ids from the names."""
    parent = None
    for i, n in enumerate(names):
        m.add(n, parent, _page(*[ord(n)] * size))
        parent = n


def test_the_chain_gives_the_whole_prefix_and_checks_the_keys_are_consecutive():
    m = PageTokenMap()
    _chain_of(m, "abcd")
    c = m.chain(["b", "c"])
    assert c is not None
    assert c.tokens.tolist() == [97, 97, 98, 98, 99, 99]
    assert (c.hashes, c.starts, c.first) == (["a", "b", "c"], [0, 2, 4], 1)
    assert c.end(2) == 6
    assert m.chain(["b", "d"]) is None  # not consecutive
    assert m.chain(["z"]) is None and m.chain([]) is None


def test_a_chain_completes_to_a_chunk_through_the_latest_continuation():
    m = PageTokenMap()
    _chain_of(m, "abcd")
    m.add("x", "b", _page(120, 120))  # a second continuation of b, hashed later
    m.add("y", "x", _page(121, 121))
    c = m.chain(["a"], complete_to=8)
    assert c is not None and c.hashes == ["a", "b", "x", "y"] and c.first == 0
    assert len(c.tokens) == 8
    assert m.chain(["c"], complete_to=8).hashes == ["a", "b", "c", "d"]


def test_an_unrooted_or_dropped_page_is_unknown():
    m = PageTokenMap(capacity=3)
    m.add("s1", "seed-of-a-lora-request", _page(1, 2))
    assert m.chain(["s1"]) is None  # its chain starts at a seed, not a first page
    _chain_of(m, "abc")  # evicts s1
    assert len(m) == 3 and m.chain(["c"]) is not None  # the walk touched c, b, a
    m.add("d", "c", _page(5, 5))  # drops the least recently used: c
    assert m.chain(["d"]) is None and m.chain(["a"]) is not None
