"""Prometheus metrics of one tiered store (prometheus_client), in its own registry.

Every store has its own :class:`~prometheus_client.CollectorRegistry`, so several stores
in one process (or one test session) never clash; scrape it with
:meth:`StoreMetrics.serve` (an HTTP endpoint) or read :meth:`StoreMetrics.text`.

Per tier (label ``tier``), read from the tiers at scrape time (no double bookkeeping):

======================================  =====================================================
``kvtc_tier_hits_total``                keys a tier's ``get`` found
``kvtc_tier_misses_total``              keys a tier's ``get`` did not find
``kvtc_tier_bytes_read_total``          bytes a tier's ``get`` returned
``kvtc_tier_bytes_written_total``       bytes newly stored by a tier's ``put``
``kvtc_tier_evictions_total``           chunks evicted to stay under the cap
``kvtc_tier_errors_total``              failed requests as the tier counts them (S3)
``kvtc_tier_failed_calls_total``        store calls to the tier that raised (label ``op``:
                                        get, exists, delete, promote, write-down)
``kvtc_tier_used_bytes``                bytes stored (S3: as of its last listing)
``kvtc_tier_capacity_bytes``            the tier's cap (absent when it has none)
``kvtc_tier_chunks``                    chunks stored
``kvtc_writedown_queue_depth``          chunks queued or in flight for a lower tier
``kvtc_writedown_failed_chunks_total``  chunks whose write-down failed
======================================  =====================================================

Per store: ``kvtc_encode_seconds`` and ``kvtc_decode_seconds`` (histograms, one
observation per ``put`` encode and per ``get`` decode), ``kvtc_encode_chunks_total``,
``kvtc_store_chunks_served_total`` (label ``source``: a tier, ``write-queue`` or
``prefetch``), ``kvtc_store_corrupt_chunks_total``, ``kvtc_store_misfiled_chunks_total``,
``kvtc_store_undecodable_chunks_total``.

With a codec that follows a registry profile (``codec.registry``;
:class:`~kvtc_store.registry.VersionedCodec`), :class:`VersionMetrics` adds:

========================================  ===================================================
``kvtc_codec_current_info``               1, labels ``profile`` and ``artifact_id``: what
                                          new chunks are encoded with
``kvtc_codec_artifact_hits_total``        chunks decoded, by ``artifact_id``
``kvtc_codec_unknown_artifact_misses``    blobs whose artifact the registry does not hold
``_total``                                (kept, served as misses)
``kvtc_codec_refresh_failures_total``     pointer reads that failed (registry unreachable)
``kvtc_codec_cached_artifacts``           artifacts held in memory
========================================  ===================================================

With a per-chunk mixture of calibrations (``codec.specialists``;
:class:`~kvtc_store.codec.MixtureCodec`), :class:`MixtureMetrics` adds
``kvtc_codec_mixture_chunks_chosen_total``: chunks encoded with each member (labels
``artifact_id`` and ``name``, the member's calibration corpus)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .tierstack import TierStack

log = logging.getLogger(__name__)

__all__ = ["StoreMetrics", "VersionMetrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
"""Seconds: from a GPU encode of one chunk (about 1 ms) to a CPU decode of a long prefix."""


class _TierCollector(Collector):
    """Reads the tiers' counters (``Backend.snapshot``) and the write-down state at scrape."""

    def __init__(self, stack: TierStack) -> None:
        self.stack = stack

    def collect(self) -> Iterator[Metric]:
        counters = {
            name: CounterMetricFamily(f"kvtc_tier_{name}", doc, labels=["tier"])
            for name, doc in (
                ("hits", "Keys a tier's get found."),
                ("misses", "Keys a tier's get did not find."),
                ("bytes_read", "Bytes a tier's get returned."),
                ("bytes_written", "Bytes newly stored by a tier's put."),
                ("evictions", "Chunks a tier evicted to stay under its cap."),
                ("errors", "Failed requests as the tier counts them."),
            )
        }
        gauges = {
            "used_bytes": GaugeMetricFamily(
                "kvtc_tier_used_bytes", "Bytes stored in a tier.", labels=["tier"]
            ),
            "capacity_bytes": GaugeMetricFamily(
                "kvtc_tier_capacity_bytes", "A tier's byte cap.", labels=["tier"]
            ),
            "n_items": GaugeMetricFamily("kvtc_tier_chunks", "Chunks in a tier.", labels=["tier"]),
        }
        failed_calls = CounterMetricFamily(
            "kvtc_tier_failed_calls", "Store calls to a tier that raised.", labels=["tier", "op"]
        )
        depth = GaugeMetricFamily(
            "kvtc_writedown_queue_depth",
            "Chunks queued or in flight for a lower tier.",
            labels=["tier"],
        )
        failed_chunks = CounterMetricFamily(
            "kvtc_writedown_failed_chunks", "Chunks whose write-down failed.", labels=["tier"]
        )
        wd = self.stack.write_down
        for t, tier in enumerate(self.stack.tiers):
            try:
                u = tier.snapshot()
            except Exception as exc:  # noqa: BLE001 - a scrape must not fail on one tier
                log.warning("metrics: tier %s snapshot failed: %s", tier.name, exc)
                continue
            for name, family in counters.items():
                family.add_metric([tier.name], getattr(u, name))
            gauges["used_bytes"].add_metric([tier.name], u.used_bytes)
            gauges["n_items"].add_metric([tier.name], u.n_items)
            if u.capacity_bytes is not None:
                gauges["capacity_bytes"].add_metric([tier.name], u.capacity_bytes)
            if t > 0:
                depth.add_metric([tier.name], wd.depth(t))
                failed_chunks.add_metric([tier.name], wd.failed(t))
        for (tier_name, op), n in sorted(self.stack.failures().items()):
            failed_calls.add_metric([tier_name, op], n)
        yield from counters.values()
        yield from gauges.values()
        yield failed_calls
        yield depth
        yield failed_chunks


class VersionMetrics(Collector):
    """The codec-version metrics of a :class:`~kvtc_store.registry.VersionedCodec`, read
    from its counters at scrape time (see the module docstring)."""

    def __init__(self, codec) -> None:
        self.codec = codec

    def collect(self) -> Iterator[Metric]:
        c = self.codec
        hits_by_id, unknown, refresh_failures = c.counters()
        info = GaugeMetricFamily(
            "kvtc_codec_current_info",
            "The artifact new chunks are encoded with (value 1).",
            labels=["profile", "artifact_id"],
        )
        info.add_metric([c.profile, c.current_id], 1)
        hits = CounterMetricFamily(
            "kvtc_codec_artifact_hits", "Chunks decoded, by codec artifact.", labels=["artifact_id"]
        )
        for aid, n in sorted(hits_by_id.items()):
            hits.add_metric([aid], n)
        yield info
        yield hits
        yield CounterMetricFamily(
            "kvtc_codec_unknown_artifact_misses",
            "Blobs whose codec artifact the registry does not hold (kept, served as misses).",
            value=unknown,
        )
        yield CounterMetricFamily(
            "kvtc_codec_refresh_failures",
            "Reads of the profile's pointer that failed (registry unreachable or garbage).",
            value=refresh_failures,
        )
        yield GaugeMetricFamily(
            "kvtc_codec_cached_artifacts",
            "Codec artifacts held in memory.",
            value=len(c.cached_ids()),
        )


class MixtureMetrics(Collector):
    """The per-member counters of a :class:`~kvtc_store.codec.MixtureCodec`, read at
    scrape time: ``kvtc_codec_mixture_chunks_chosen_total`` (labels ``artifact_id`` and
    ``name``, the member's calibration corpus)."""

    def __init__(self, codec) -> None:
        self.codec = codec

    def collect(self) -> Iterator[Metric]:
        chosen = CounterMetricFamily(
            "kvtc_codec_mixture_chunks_chosen",
            "Chunks encoded with each member of a per-chunk codec mixture.",
            labels=["artifact_id", "name"],
        )
        for aid, name, n in self.codec.chosen_by_artifact():
            chosen.add_metric([aid, name], n)
        yield chosen


def register_codec_metrics(codec, registry: CollectorRegistry) -> None:
    """Add a codec's own metrics to a store's registry: a registry-following codec's
    (its ``register_metrics``), a mixture's (:class:`MixtureMetrics`); others have none."""
    if hasattr(codec, "register_metrics"):
        codec.register_metrics(registry)
    elif hasattr(codec, "chosen_by_artifact"):
        registry.register(MixtureMetrics(codec))


class StoreMetrics:
    """The Prometheus metrics of one store (see the module docstring for the list).

    Args:
        stack: the store's tiers.
        registry: registry to put the metrics in; default: a new one for this store.

    Attributes:
        registry: the store's :class:`~prometheus_client.CollectorRegistry`.
        encode_seconds, decode_seconds: latency histograms (seconds).
        chunks_encoded: counter of chunks encoded by ``put``.
        chunks_served: counter of chunks ``get`` returned, by ``source``.
        corrupt_chunks: counter of blobs dropped because they did not decode.
        misfiled_chunks: counter of intact blobs dropped because they were written for
            another chunk than the key they were fetched under.
        undecodable_chunks: counter of blobs dropped because no codec here decodes them.
    """

    def __init__(self, stack: TierStack, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.encode_seconds = Histogram(
            "kvtc_encode_seconds",
            "Seconds to encode the new chunks of one put.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decode_seconds = Histogram(
            "kvtc_decode_seconds",
            "Seconds to decode the fetched prefix of one get.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.chunks_encoded = Counter("kvtc_encode_chunks", "Chunks encoded by put.", registry=r)
        self.chunks_served = Counter(
            "kvtc_store_chunks_served",
            "Chunks get returned, by the tier (or write-queue, prefetch) that served them.",
            ["source"],
            registry=r,
        )
        self.corrupt_chunks = Counter(
            "kvtc_store_corrupt_chunks",
            "Blobs that failed their checksum or did not decode (deleted, served as misses).",
            registry=r,
        )
        self.misfiled_chunks = Counter(
            "kvtc_store_misfiled_chunks",
            "Intact blobs written for another chunk than the key they were under (deleted, "
            "served as misses).",
            registry=r,
        )
        self.undecodable_chunks = Counter(
            "kvtc_store_undecodable_chunks",
            "Blobs written by a codec this store cannot decode (deleted, served as misses).",
            registry=r,
        )
        self.codec_on_cpu = Gauge(
            "kvtc_codec_on_cpu",
            "1 when a serving engine's KV is coded by the CPU reference codec although a "
            "CUDA device is present (the batched GPU codec is not in use; see the log).",
            registry=r,
        )
        r.register(_TierCollector(stack))
        self.stack = stack
        self._server = None
        self._thread: threading.Thread | None = None

    def text(self) -> str:
        """The metrics in Prometheus' text exposition format."""
        return generate_latest(self.registry).decode()

    def serve(self, port: int = 0, addr: str = "127.0.0.1") -> int:
        """Expose the metrics over HTTP at ``http://addr:port/metrics`` and the store's
        health at ``/healthz``; return the port.

        ``/healthz`` answers JSON (:meth:`kvtc_store.tierstack.TierStack.health`: per tier its
        circuit state, queue depth and capacity use), status 200 when every tier is
        reachable and 503 when a breaker is open: a Kubernetes probe's answer
        (docs/operations.md). ``port=0`` picks a free port. One server per store; a
        second call returns the first server's port. Stopped by :meth:`close` (and the
        store's ``close``).
        """
        if self._server is None:
            self._server, self._thread = _serve(self, port, addr)
        return self._server.server_address[1]

    def close(self) -> None:
        """Stop the HTTP server, if one runs."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


def _serve(metrics: StoreMetrics, port: int, addr: str):
    """A threaded WSGI server of prometheus_client's metrics app plus ``/healthz``, on a
    daemon thread: ``(server, thread)``."""
    import json
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import make_wsgi_app

    prometheus = make_wsgi_app(metrics.registry)

    def app(environ, start_response):
        if environ.get("PATH_INFO") == "/healthz":
            report = metrics.stack.health()
            body = json.dumps(report).encode()
            status = "200 OK" if report["ok"] else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [body]
        return prometheus(environ, start_response)

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format, *args):
            pass

    server = make_server(addr, port, app, Server, handler_class=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="kvtc-metrics", daemon=True)
    thread.start()
    return server, thread
