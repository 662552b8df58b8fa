"""Tests of the memory tier's eviction policies: LRU and S3-FIFO (Yang et al., SOSP 2023)."""

from __future__ import annotations

from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtc_store.backends import GPUBackend, MemoryBackend
from kvtc_store.errors import CapacityError, ConfigError
from tests.test_backends import _ops, k

POLICIES = ["lru", "s3fifo"]
TIERS = {
    "memory": MemoryBackend,
    "gpu-code-on-cpu": partial(GPUBackend, device="cpu"),  # same policies, tensor values
}


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(sorted(TIERS)),
    policy=st.sampled_from(POLICIES),
    cap=st.integers(0, 300),
    ops=_ops,
)
def test_cap_never_exceeded_and_counters_agree(
    kind: str, policy: str, cap: int, ops: list[tuple[str, int, int]]
) -> None:
    """Random puts/gets/deletes: the cap holds after every op, values are the ones put,
    and hits, misses, evictions and bytes match what was observed."""
    tier = TIERS[kind](cap, policy=policy)
    stored: dict[str, bytes] = {}  # what the tier held after the previous op
    hits = misses = evictions = written = read = 0
    for op, i, size in ops:
        key = k(i)
        if op == "put":
            value = bytes([i]) * size
            if size > cap:
                with pytest.raises(CapacityError):
                    tier.put([(key, value)])
            else:
                tier.put([(key, value)])
                if key not in stored:
                    stored[key] = value
                    written += size
        elif op == "get":
            got = tier.get([key])[0]
            assert got == stored.get(key)
            hits, misses = hits + (got is not None), misses + (got is None)
            read += len(got or b"")
        else:
            tier.delete([key])
            stored.pop(key, None)
        present = {kk for kk in stored if tier.exists([kk])[0]}
        evictions += len(stored) - len(present)  # a key vanished without a delete
        stored = {kk: v for kk, v in stored.items() if kk in present}
        u = tier.usage()
        assert u.used_bytes <= cap
        assert u.used_bytes == sum(map(len, stored.values()))
        assert u.n_items == len(stored)
        assert tier.exists([k(j) for j in range(16)]) == [k(j) in stored for j in range(16)]
        assert (u.hits, u.misses, u.evictions) == (hits, misses, evictions)
        assert (u.bytes_written, u.bytes_read) == (written, read)


@pytest.mark.parametrize("kind", sorted(TIERS))
def test_s3fifo_is_scan_resistant_and_lru_is_not(kind: str) -> None:
    """A hot set read repeatedly survives a one-time scan larger than the cache under
    S3-FIFO; under LRU the scan flushes it."""
    hot = [k(i) for i in range(20)]  # 200 of 1,000 bytes
    scan = [k(1000 + i) for i in range(500)]  # 5,000 bytes, each put once, never read
    survivors = {}
    for policy in POLICIES:
        tier = TIERS[kind](1000, policy=policy)
        tier.put([(key, b"h" * 10) for key in hot])
        for _ in range(2):
            assert tier.get(hot) == [b"h" * 10] * len(hot)
        for key in scan:
            tier.put([(key, b"s" * 10)])
        assert tier.usage().used_bytes <= 1000
        survivors[policy] = sum(tier.exists(hot))
    assert survivors == {"lru": 0, "s3fifo": len(hot)}


def test_s3fifo_one_hit_chunks_leave_from_the_small_queue_first() -> None:
    tier = MemoryBackend(1000, policy="s3fifo")
    tier.put([(k(i), b"x" * 100) for i in range(10)])  # full, all in S
    tier.get([k(0)])  # 0 was read again
    tier.put([(k(10), b"x" * 100)])  # S's head 0 moves to M; 1 is evicted
    assert tier.exists([k(0), k(1), k(2), k(10)]) == [True, False, True, True]
    assert tier.usage().evictions == 1


def test_s3fifo_ghost_readmission_goes_to_main() -> None:
    tier = MemoryBackend(1000, policy="s3fifo")
    tier.put([(k(i), b"x" * 100) for i in range(10)])
    tier.put([(k(10), b"x" * 100)])  # evicts 0, unread, from S: its key goes to G
    policy = tier._policy
    assert not tier.exists([k(0)])[0] and k(0) in policy.ghost
    tier.put([(k(0), b"x" * 100)])  # in G: admitted straight to M
    assert k(0) in policy.main and k(0) not in policy.small and k(0) not in policy.ghost
    # a new key takes S instead: it leaves before the re-admitted one
    for i in range(11, 30):
        tier.put([(k(i), b"x" * 100)])
    assert tier.exists([k(0)]) == [True]
    assert tier.exists([k(11)]) == [False]


def test_s3fifo_main_queue_gives_read_chunks_another_round() -> None:
    """From M, a chunk read since its last round is reinserted (freq decremented);
    an unread one is evicted. Frequencies are capped at 3."""
    tier = MemoryBackend(1000, policy="s3fifo")
    tier.put([(k(i), b"x" * 300) for i in range(3)])
    tier.get([k(0)] * 10 + [k(1), k(2)])  # 0: freq 3 (capped), 1 and 2: freq 1
    # S's 0, 1, 2 all move to M; rounds of M: 0 (3->2), 1 (1->0), 2 (1->0), 0 (2->1),
    # then 1 is evicted
    tier.put([(k(3), b"x" * 300)])
    policy = tier._policy
    assert list(policy.main) == [k(2), k(0)] and list(policy.small) == [k(3)]
    assert (policy._freq[k(0)], policy._freq[k(2)]) == (1, 0)
    assert tier.exists([k(i) for i in range(4)]) == [True, False, True, True]
    assert tier.usage().evictions == 1


def test_delete_and_reput_under_s3fifo() -> None:
    tier = MemoryBackend(100, policy="s3fifo")
    tier.put([(k(1), b"a" * 60), (k(2), b"b" * 40)])
    tier.delete([k(1), k(9)])
    assert tier.usage().used_bytes == 40 and tier.usage().evictions == 0
    tier.put([(k(2), b"ignored")])  # re-put is a no-op
    assert tier.get([k(2)]) == [b"b" * 40]
    with pytest.raises(CapacityError):
        tier.put([(k(3), b"z" * 101)])
    tier.put([(k(3), b"z" * 100)])  # exactly the capacity: evicts 2
    assert tier.exists([k(2), k(3)]) == [False, True]


def test_unknown_policy_is_config_error() -> None:
    with pytest.raises(ConfigError, match="policy"):
        MemoryBackend(100, policy="arc")  # type: ignore[arg-type]
    assert MemoryBackend(100).policy == "lru"
