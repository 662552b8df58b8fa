"""Tests of chunk keys: the SHA-256 prefix chain of DESIGN.md, "Chunk keys"."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtc_store.keys import ROOT_KEY, ChunkNamespace, chunk_keys

NS = ChunkNamespace(model_fingerprint="smollm2-135m@abc123", kv_layout="tp0of1/bf16")

_token = st.integers(0, 2**32 - 1)


def test_chain_matches_the_design_formula() -> None:
    tokens = list(range(10))
    ns = NS.to_bytes()
    assert ROOT_KEY == hashlib.sha256(b"kvtc-store/v1").digest()
    k0 = hashlib.sha256(ROOT_KEY + ns + np.arange(0, 4, dtype="<u4").tobytes()).digest()
    k1 = hashlib.sha256(k0 + ns + np.arange(4, 8, dtype="<u4").tobytes()).digest()
    k2 = hashlib.sha256(k1 + ns + np.arange(8, 10, dtype="<u4").tobytes()).digest()
    assert chunk_keys(tokens, NS, chunk_tokens=4) == [k0.hex(), k1.hex()]
    assert chunk_keys(tokens, NS, 4, include_partial=True) == [k0.hex(), k1.hex(), k2.hex()]


def test_keys_are_frozen_across_versions() -> None:
    """A pinned vector: changing it silently empties every deployed cache (issue 22
    appended the tenant tag to tenants' keys, on purpose: their caches were emptied once)."""
    ns = ChunkNamespace("model", "layout", "tenant")
    assert ns.to_bytes() == (
        b"kvtc-ns/v1\x05\x00\x00\x00model\x06\x00\x00\x00layout\x06\x00\x00\x00tenant"
    )
    keys = chunk_keys(range(512), ns)
    assert keys == [
        "5f0b62358896eface4261134a8ea78950182df04714a8f0ea1a55bf8f465dbe5c0b48860",
        "571d39d082621f9a6af4e411330a322801e2e9c774a01205b07480470db6c4a7c0b48860",
    ]


_KEYS_CHILD = """
import json, sys
from kvtc_store.keys import ChunkNamespace, chunk_keys
ns = ChunkNamespace(*json.loads(sys.argv[1]))
print(json.dumps(chunk_keys(json.loads(sys.argv[2]), ns, chunk_tokens=16, include_partial=True)))
"""


def test_same_tokens_same_keys_in_another_process() -> None:
    tokens = np.random.default_rng(0).integers(0, 2**32, size=100, dtype=np.uint64).tolist()
    ns = ChunkNamespace("m", "tp1of2/fp8", "acme")
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _KEYS_CHILD,
            json.dumps([ns.model_fingerprint, ns.kv_layout, ns.tenant]),
            json.dumps(tokens),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    here = chunk_keys(tokens, ns, chunk_tokens=16, include_partial=True)
    assert json.loads(out) == here
    assert len(here) == 7 and len(set(here)) == 7


@settings(max_examples=100, deadline=None)
@given(tokens=st.lists(_token, max_size=60), chunk=st.integers(1, 9), data=st.data())
def test_keys_of_a_prefix_are_a_prefix_of_the_keys(
    tokens: list[int], chunk: int, data: st.DataObject
) -> None:
    cut = data.draw(st.integers(0, len(tokens)))
    full = chunk_keys(tokens, NS, chunk)
    assert len(full) == len(tokens) // chunk
    assert chunk_keys(tokens[:cut], NS, chunk) == full[: cut // chunk]
    partial = chunk_keys(tokens[:cut], NS, chunk, include_partial=True)
    assert partial[: cut // chunk] == full[: cut // chunk]


@settings(max_examples=100, deadline=None)
@given(tokens=st.lists(_token, min_size=1, max_size=60), chunk=st.integers(1, 9), data=st.data())
def test_one_changed_token_changes_its_chunk_and_all_later_ones(
    tokens: list[int], chunk: int, data: st.DataObject
) -> None:
    pos = data.draw(st.integers(0, len(tokens) - 1))
    new = data.draw(_token.filter(lambda t: t != tokens[pos]))
    changed = [*tokens[:pos], new, *tokens[pos + 1 :]]
    a = chunk_keys(tokens, NS, chunk, include_partial=True)
    b = chunk_keys(changed, NS, chunk, include_partial=True)
    hit = pos // chunk
    assert a[:hit] == b[:hit]
    assert all(x != y for x, y in zip(a[hit:], b[hit:]))


@pytest.mark.parametrize(
    "other",
    [
        ChunkNamespace(NS.model_fingerprint, NS.kv_layout, tenant="tenant-b"),
        ChunkNamespace("another-model", NS.kv_layout),
        ChunkNamespace(NS.model_fingerprint, "tp1of2/bf16"),
    ],
)
def test_other_tenant_model_or_layout_gives_disjoint_keys(other: ChunkNamespace) -> None:
    tokens = list(range(1000))
    mine = chunk_keys(tokens, NS, 64, include_partial=True)
    theirs = chunk_keys(tokens, other, 64, include_partial=True)
    assert not set(mine) & set(theirs)


def test_namespace_encoding_is_unambiguous() -> None:
    pairs = [
        (ChunkNamespace("ab", "c"), ChunkNamespace("a", "bc")),
        (ChunkNamespace("a", "b", ""), ChunkNamespace("a", "", "b")),
        (ChunkNamespace("m", "l", "t"), ChunkNamespace("m", "l", "t\x00")),
    ]
    for x, y in pairs:
        assert x.to_bytes() != y.to_bytes()
        assert chunk_keys([1, 2], x, 2) != chunk_keys([1, 2], y, 2)
    assert ChunkNamespace("é", "l").to_bytes() == ChunkNamespace("é", "l").to_bytes()
    with pytest.raises(TypeError):
        ChunkNamespace(b"model", "l")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n_tokens", "expected", "expected_partial"),
    [(0, 0, 0), (1, 0, 1), (255, 0, 1), (256, 1, 1), (257, 1, 2), (600, 2, 3), (768, 3, 3)],
)
def test_partial_chunk_handling(n_tokens: int, expected: int, expected_partial: int) -> None:
    tokens = list(range(n_tokens))
    full = chunk_keys(tokens, NS)
    with_partial = chunk_keys(tokens, NS, include_partial=True)
    assert len(full) == expected and len(with_partial) == expected_partial
    assert with_partial[:expected] == full
    if expected_partial > expected:  # the partial key is not the key the full chunk gets
        grown = chunk_keys(list(range(256 * expected_partial)), NS)
        assert with_partial[-1] != grown[expected_partial - 1]


def test_input_types_give_identical_keys() -> None:
    ids = [0, 1, 70000, 2**31, 2**32 - 1, 5, 6, 7, 8]
    want = chunk_keys(ids, NS, 4, include_partial=True)
    for variant in (
        tuple(ids),
        np.array(ids, dtype=np.int64),
        np.array(ids, dtype=np.uint32),
        np.array(ids, dtype=np.uint64),
        torch.tensor(ids, dtype=torch.int64),
        torch.tensor(ids, dtype=torch.int64)[::1],
    ):
        assert chunk_keys(variant, NS, 4, include_partial=True) == want
    small = list(range(12))
    assert chunk_keys(range(12), NS, 4) == chunk_keys(small, NS, 4)
    assert chunk_keys(torch.arange(12, dtype=torch.int32), NS, 4) == chunk_keys(small, NS, 4)
    strided = np.arange(24, dtype=np.int64)[::2]
    assert chunk_keys(strided, NS, 4) == chunk_keys(strided.tolist(), NS, 4)


@pytest.mark.parametrize(
    "bad",
    [
        [1, -1],
        [2**32],
        [2**64],
        [1.0, 2.0],
        np.array([1.5]),
        np.array([[1, 2], [3, 4]]),
        torch.tensor([-3]),
        torch.tensor([0.5]),
        [True, False],
        ["1", "2"],
    ],
)
def test_bad_token_ids_raise_value_error(bad: object) -> None:
    with pytest.raises(ValueError):
        chunk_keys(bad, NS, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("chunk", [0, -4, 2.0, True])
def test_bad_chunk_size_raises(chunk: object) -> None:
    with pytest.raises(ValueError):
        chunk_keys([1, 2, 3], NS, chunk)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        chunk_keys([1, 2, 3], "namespace", 1)  # type: ignore[arg-type]


def test_long_sequence_is_fast() -> None:
    """128k tokens hash in one vectorised conversion plus 512 sha256 calls."""
    import time

    tokens = np.random.default_rng(1).integers(0, 128_000, size=131_072)
    start = time.perf_counter()
    keys = chunk_keys(tokens, NS)
    assert len(keys) == 512
    assert time.perf_counter() - start < 1.0
