"""The tiered chunk store (first cut: synchronous write-through over byte-only tiers).

A stored sequence is cut into chunks of ``chunk_tokens`` tokens; chunk ``i`` is named by
the prefix-hash chain of :mod:`kvtc_store.keys`, so equal prefixes share chunks across
processes and replicas. Each chunk is encoded once with the KVTC codec into a blob and
written to every tier (write-through), top tier first. A get fetches each chunk from the
highest tier that holds it and promotes it into the tiers above. A blob that fails its
checksum or does not decode is deleted from the tier it came from and counted as a miss:
a damaged tier never yields wrong KV.

Tiers are :class:`kvtc_store.backends.Backend` objects (bytes in, bytes out), ordered
from the fastest (CPU memory) to the slowest (disk, later S3).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .backends import Backend
from .codec import KVTCCodec
from .errors import CodecMismatchError, ConfigError, KVTCError, StoreError
from .keys import ChunkNamespace, chunk_keys
from .model import ModelInfo

log = logging.getLogger(__name__)


@dataclass
class StoreStats:
    """Counters of one store instance (chunks, bytes, seconds)."""

    chunks_put: int = 0
    chunks_skipped: int = 0
    bytes_put: int = 0
    raw_bf16_bytes_put: int = 0
    chunks_hit: dict[str, int] = field(default_factory=dict)
    chunks_missed: int = 0
    corrupt_dropped: int = 0
    lower_tier_put_errors: int = 0
    encode_seconds: float = 0.0
    decode_seconds: float = 0.0

    def honest_ratio(self) -> float:
        """bf16 bytes of everything put / every byte of the blobs written."""
        return self.raw_bf16_bytes_put / self.bytes_put if self.bytes_put else 0.0


@dataclass
class PutResult:
    """What :meth:`TieredStore.put` did: chunks encoded and written, chunks already
    present, blob bytes written and the bf16 bytes they stand for."""

    chunks_written: int
    chunks_present: int
    blob_bytes: int
    raw_bf16_bytes: int


class TieredStore:
    """KV chunks of one model, compressed with KVTC, over an ordered list of tiers.

    Args:
        tiers: backends from the top (fastest) to the bottom; at least one.
        codec: the KVTC codec (its artifact must match the model whose KV is stored).
        namespace: model fingerprint, KV layout and tenant salt for the chunk keys.
        chunk_tokens: tokens per chunk (256, LMCache's default).
    """

    def __init__(
        self,
        tiers: Sequence[Backend],
        codec: KVTCCodec,
        namespace: ChunkNamespace,
        chunk_tokens: int = 256,
    ):
        if not tiers:
            raise ValueError("a TieredStore needs at least one tier")
        self.tiers = list(tiers)
        self.codec = codec
        self.namespace = namespace
        self.chunk_tokens = chunk_tokens
        self.stats = StoreStats()

    @classmethod
    def from_config(
        cls,
        path,
        info: ModelInfo,
        *,
        model=None,
        tokenizer=None,
        dtype: str = "bfloat16",
        tp_rank: int = 0,
        tp_size: int = 1,
        progress=None,
    ) -> TieredStore:
        """A store as the YAML config at ``path`` (plus ``KVTC_STORE_*`` overrides) says.

        Args:
            path: YAML file (see docs/config.md).
            info: the model's identity (:func:`kvtc_store.model.model_info`).
            model, tokenizer: needed only when ``codec.artifact`` is unset and no
                calibrated artifact is cached for the model yet.
            dtype, tp_rank, tp_size: the KV layout, part of the chunk-key namespace.

        Raises:
            ConfigError: malformed config (the message names the field), or a setting
                not implemented yet (write-back).
            ArtifactError: the codec artifact is missing, malformed or for another model.
        """
        from .config import build_tiers, codec_from_config, load_config

        cfg = load_config(path)
        if cfg.write_mode != "write-through":
            raise ConfigError(f"{path}: write_mode: {cfg.write_mode!r} is not implemented yet")
        codec = codec_from_config(cfg, info, model=model, tokenizer=tokenizer, progress=progress)
        namespace = ChunkNamespace(
            info.fingerprint, info.kv_layout(dtype, tp_rank, tp_size), cfg.tenant
        )
        return cls(build_tiers(cfg), codec, namespace, chunk_tokens=cfg.chunk_tokens)

    def keys_for(self, tokens) -> list[str]:
        """Chunk keys of every full chunk of ``tokens`` (token ids, 1-D)."""
        return chunk_keys(tokens, self.namespace, self.chunk_tokens)

    def lookup(self, tokens) -> int:
        """Length in tokens of the longest cached prefix of ``tokens``.

        One batched ``exists`` per tier; side-effect free. Returns a multiple of
        ``chunk_tokens``.
        """
        keys = self.keys_for(tokens)
        present = [False] * len(keys)
        for tier in self.tiers:
            missing = [i for i, p in enumerate(present) if not p]
            if not missing:
                break
            try:
                hits = tier.exists([keys[i] for i in missing])
            except KVTCError as exc:  # a failed tier degrades to misses, never to errors
                log.warning("tier %s failed on exists: %s", tier.name, exc)
                continue
            for i, hit in zip(missing, hits):
                present[i] = present[i] or hit
        n = 0
        while n < len(keys) and present[n]:
            n += 1
        return n * self.chunk_tokens

    @torch.no_grad()
    def put(self, tokens, keys: torch.Tensor, values: torch.Tensor) -> PutResult:
        """Store the KV of every full chunk of ``tokens`` not yet stored.

        Args:
            tokens: token ids ``(T,)`` of the sequence, from position 0.
            keys, values: ``(L, H, T', D)``, ``T'`` at least the length of the full chunks;
                RoPE applied to keys (as cached).

        The stored sequence is the full chunks of ``tokens``; its last ``window`` tokens
        are stored exactly. The cached prefix (see :meth:`lookup`) is skipped: blobs are
        immutable and content-addressed.

        Raises:
            ValueError: fewer KV tokens than the full chunks need.
            StoreError: the top tier failed to write (CapacityError if it is full); a
                lower tier's failure is logged and counted, the chunks stay in the top tier.
        """
        ckeys = self.keys_for(tokens)
        stored = len(ckeys) * self.chunk_tokens
        if keys.shape[2] < stored:
            raise ValueError(f"KV holds {keys.shape[2]} tokens, the chunks need {stored}")
        first_new = self.lookup(tokens) // self.chunk_tokens if ckeys else 0
        todo = list(range(first_new, len(ckeys)))
        if not todo:
            self.stats.chunks_skipped += len(ckeys)
            return PutResult(0, len(ckeys), 0, 0)
        t0 = time.perf_counter()
        s = first_new * self.chunk_tokens
        blobs = self.codec.encode_sequence(
            keys[:, :, s:stored],
            values[:, :, s:stored],
            first_position=s,
            chunk_tokens=self.chunk_tokens,
        )
        self.stats.encode_seconds += time.perf_counter() - t0
        items = [(ckeys[i], b) for i, b in zip(todo, blobs)]
        self.tiers[0].put(items)  # the top tier's failure is the caller's error
        for tier in self.tiers[1:]:
            try:
                tier.put(items)
            except StoreError as exc:  # a lower tier down: the top tier still serves
                log.warning("write-through to %s failed: %s", tier.name, exc)
                self.stats.lower_tier_put_errors += 1
        nbytes = sum(len(b) for b in blobs)
        raw = len(todo) * self.chunk_tokens * keys.shape[0] * keys.shape[1] * keys.shape[3] * 4
        self.stats.chunks_put += len(todo)
        self.stats.chunks_skipped += first_new
        self.stats.bytes_put += nbytes
        self.stats.raw_bf16_bytes_put += raw
        return PutResult(len(todo), first_new, nbytes, raw)

    def _fetch(self, keys: list[str]) -> list[bytes | None]:
        """Blobs for ``keys`` from the highest tier holding each; promote on hit."""
        blobs: list[bytes | None] = [None] * len(keys)
        found_in: list[int] = [-1] * len(keys)
        for t, tier in enumerate(self.tiers):
            missing = [i for i, b in enumerate(blobs) if b is None]
            if not missing:
                break
            try:
                got = tier.get([keys[i] for i in missing])
            except KVTCError as exc:
                log.warning("tier %s failed on get: %s", tier.name, exc)
                continue
            for i, b in zip(missing, got):
                if b is not None:
                    blobs[i], found_in[i] = b, t
        for t in range(1, len(self.tiers)):
            promote = [(keys[i], blobs[i]) for i in range(len(keys)) if found_in[i] == t]
            for upper in self.tiers[:t]:
                if promote:
                    try:
                        upper.put(promote)
                    except StoreError as exc:
                        log.warning("promotion into %s failed: %s", upper.name, exc)
        for i, t in enumerate(found_in):
            if t >= 0:
                name = self.tiers[t].name
                self.stats.chunks_hit[name] = self.stats.chunks_hit.get(name, 0) + 1
        return blobs

    @torch.no_grad()
    def get(
        self,
        tokens,
        n_tokens: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """KV of the longest cached prefix of ``tokens`` (up to ``n_tokens``).

        Args:
            tokens: token ids ``(T,)``.
            n_tokens: fetch at most this many tokens (rounded down to whole chunks);
                default: all of ``lookup(tokens)``.
            device, dtype: of the returned tensors (default: codec device, stored dtype).

        Returns:
            ``(keys, values)``, each ``(L, H, n, D)`` with ``n`` a multiple of
            ``chunk_tokens``, keys with RoPE applied; or ``None`` when nothing is cached.
            A chunk that is missing, corrupt or undecodable ends the prefix there (corrupt
            blobs are deleted from their tier).
        """
        ckeys = self.keys_for(tokens)
        if n_tokens is not None:
            ckeys = ckeys[: n_tokens // self.chunk_tokens]
        blobs = self._fetch(ckeys)
        present = 0
        while present < len(blobs) and blobs[present] is not None:
            present += 1
        if present < len(blobs):
            self.stats.chunks_missed += 1
        t0 = time.perf_counter()
        chunks, error = self.codec.decode_prefix(blobs[:present], device=device, dtype=dtype)
        self.stats.decode_seconds += time.perf_counter() - t0
        if isinstance(error, CodecMismatchError):
            # Written by another codec version: valid data this codec cannot read. Keep
            # it (a re-encode job migrates it); serve a miss from there on.
            log.info("chunk %s needs another codec: %s", ckeys[len(chunks)][:12], error)
            self.stats.chunks_missed += 1
        elif error is not None:
            key = ckeys[len(chunks)]
            log.warning("dropping undecodable chunk %s: %s", key[:12], error)
            self.stats.corrupt_dropped += 1
            for tier in self.tiers:
                tier.delete([key])
        ks = [c.keys for c in chunks]
        vs = [c.values for c in chunks]
        if not ks:
            return None
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2)

    def usage(self) -> dict:
        """Per tier: :class:`~kvtc_store.backends.TierUsage` as a dict."""
        from dataclasses import asdict

        return {t.name: asdict(t.usage()) for t in self.tiers}
