"""Prometheus metrics of a store: per-store registries, per-tier values, HTTP exposure."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvtc_store.backends import DiskBackend, MemoryBackend, S3Backend
from kvtc_store.store import TieredStore
from tests.s3_server import closed_port
from tests.tiny_codec import (
    CHUNK,
    tiny_artifact,
    tiny_blobs,
    tiny_codec,
    tiny_info,
    tiny_namespace,
    tiny_sequence,
)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` of a text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def store_of(tiers) -> TieredStore:
    return TieredStore(tiers, tiny_codec(), tiny_namespace(), chunk_tokens=CHUNK)


def test_per_tier_and_codec_metrics(tmp_path: Path) -> None:
    tokens, keys, values = tiny_sequence(4)
    blob = max(map(len, tiny_blobs(tokens, keys, values)))
    with store_of([MemoryBackend(2 * blob + 10), DiskBackend(tmp_path, 1 << 20)]) as store:
        store.put(tokens, keys, values)  # 4 chunks: 2 evicted from memory
        assert store.flush(timeout=30)
        store.get(tokens)  # 2 from memory, 2 from disk (promoted, evicting 2 more)
        other, *_ = tiny_sequence(1, seed=9)
        store.get(other)  # a miss everywhere
        m = samples(store.metrics.text())
    mem, disk = (("tier", "memory"),), (("tier", "disk"),)
    assert m["kvtc_tier_hits_total", mem] == 2 and m["kvtc_tier_hits_total", disk] == 2
    assert m["kvtc_tier_misses_total", mem] == 2 + 1 and m["kvtc_tier_misses_total", disk] == 1
    assert m["kvtc_tier_evictions_total", mem] == 4
    assert m["kvtc_tier_chunks", mem] == 2 and m["kvtc_tier_chunks", disk] == 4
    disk_bytes = m["kvtc_tier_used_bytes", disk]
    assert m["kvtc_tier_bytes_written_total", disk] == disk_bytes > 0
    assert m["kvtc_tier_bytes_read_total", disk] > 0
    assert m["kvtc_tier_capacity_bytes", disk] == 1 << 20
    assert m["kvtc_writedown_queue_depth", disk] == 0
    assert m["kvtc_writedown_failed_chunks_total", disk] == 0
    assert m["kvtc_encode_seconds_count", ()] == 1 and m["kvtc_encode_chunks_total", ()] == 4
    assert m["kvtc_decode_seconds_count", ()] == 2 and m["kvtc_decode_seconds_sum", ()] > 0
    assert m["kvtc_store_chunks_served_total", (("source", "memory"),)] == 2
    assert m["kvtc_store_chunks_served_total", (("source", "disk"),)] == 2


def test_each_store_has_its_own_registry() -> None:
    a = store_of([MemoryBackend(1 << 20)])
    b = store_of([MemoryBackend(1 << 20)])  # the same metric names: no clash
    tokens, keys, values = tiny_sequence(2)
    a.put(tokens, keys, values)
    assert samples(a.metrics.text())["kvtc_encode_chunks_total", ()] == 2
    assert samples(b.metrics.text())["kvtc_encode_chunks_total", ()] == 0
    a.close()
    b.close()


def test_failures_and_errors_of_a_dead_tier(aws_credentials) -> None:
    dead = S3Backend("kvtc-dead", endpoint_url=f"http://127.0.0.1:{closed_port()}", max_attempts=1)
    tokens, keys, values = tiny_sequence(3)
    with store_of([MemoryBackend(1 << 20), dead]) as store:
        store.put(tokens, keys, values)
        assert store.flush(timeout=30).failed_chunks == {"s3": 3}
        store.lookup(tiny_sequence(1, seed=5)[0])
        m = samples(store.metrics.text())
    s3 = (("tier", "s3"),)
    assert m["kvtc_writedown_failed_chunks_total", s3] == 3
    assert m["kvtc_tier_failed_calls_total", (("op", "write-down"), ("tier", "s3"))] == 1
    assert m["kvtc_tier_failed_calls_total", (("op", "exists"), ("tier", "s3"))] == 1
    assert m["kvtc_tier_errors_total", s3] == 3 + 1
    assert ("kvtc_tier_capacity_bytes", s3) not in m  # no cap, no sample


def test_metrics_over_http_from_config(tmp_path: Path) -> None:
    tiny_artifact().save(tmp_path / "art")
    config = tmp_path / "store.yaml"
    config.write_text(
        "chunk_tokens: 16\n"
        "tiers: [{kind: memory, capacity: 1MiB}]\n"
        "metrics: {port: 0}\n"
        "codec: {artifact: art}\n"
    )
    store = TieredStore.from_config(config, tiny_info())
    port = store.metrics.serve()  # already serving: the same port
    assert port > 0
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read().decode()
    assert 'kvtc_tier_used_bytes{tier="memory"} 0.0' in body
    store.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)
