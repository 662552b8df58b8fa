"""A per-chunk mixture of calibrations: every chunk coded by whichever of several codecs
of one model and one target ratio reconstructs it best.

One calibration's PCA bases fit the text it read; on text unlike it (another language,
another genre) the same bit budget buys more error. A mixture keeps several calibrated
bases (the default and specialists) and lets each chunk pick: the local-PCA idea of
Kambhatla & Leen, "Dimension Reduction by Local Principal Component Analysis" (Neural
Computation 9(7), 1997) and the hard-assignment limit of Tipping & Bishop, "Mixtures of
Probabilistic Principal Component Analyzers" (Neural Computation 11(2), 1999), with the
assignment made per stored chunk by the reconstruction error the codec actually gives.

- **Encode** (:meth:`MixtureCodec.encode_batch`): each member encodes the batch, each
  candidate blob is decoded, and chunk ``b`` keeps the blob of the member with the least
  normalised error ``sum((K' - K)^2) / sum(K^2) + sum((V' - V)^2) / sum(V^2)`` over the
  chunk's ``(L, H, T, D)`` keys and values (float32; exact tokens add the same nothing to
  every candidate). A tie goes to the earlier member, the first being the default. Encode
  work and artifact memory grow with the number of members (two members: twice the
  encode work, plus one decode per member).
- **Decode** (:meth:`MixtureCodec.decode_batch`): the blob header names its artifact, so
  blobs are grouped by ``artifact_id`` and each group decodes in one batch with its member
  into its chunks of the destination, in order. A blob of an artifact no member holds
  ends the prefix with :class:`~kvtc_store.errors.CodecMismatchError`, as for a single
  codec (the store counts a miss, never decodes it with another basis).

Measured in benchmarks/rd (``kvtc-mix-ml``, issue 17's log in
benchmarks/results/rate_distortion.md): the default ``broad`` calibration with a specialist
on Debian's man pages in seven languages, target 16, this CPU, 8 windows a genre: German
KL 0.0224 to 0.0109, Spanish man pages 0.0192 to 0.0076, English genres unchanged, ratios
unchanged.

The codec package knows tensors and bytes only: the members are any
:class:`~.protocol.Codec` (CPU reference or batched CUDA codec), and the store's metrics
read :meth:`MixtureCodec.chosen_by_artifact` (:class:`kvtc_store.metrics.MixtureMetrics`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from ..errors import BlobCorruptError, BlobError, CodecMismatchError, MixtureError
from .format import DTYPES, BlobHeader, bound_prefix, unpack_blob_header
from .layout import ChunkKV
from .protocol import ChunkBatch, Codec, CodecBase, DecodedBatch

__all__ = ["MixtureCodec", "normalised_errors"]


class MixtureCodec(CodecBase):
    """Codecs of one model and one target ratio, chosen per chunk (module doc).

    Implements the :class:`~.protocol.Codec` protocol (and :class:`~.protocol.CodecBase`'s
    single-chunk and sequence methods over it), so a
    :class:`~kvtc_store.store.TieredStore` or a connector takes it as it takes one codec.

    Args:
        members: the codecs, the default first (it wins ties); each of another
            calibration (distinct artifact ids), all of the same model fingerprint,
            ``(L, H, D)`` KV shape and target ratio, on the same device.
        names: a label per member for logs and metrics (default each artifact's
            calibration corpus, else its id).

    Attributes:
        members: the codecs, in order.
        names: their labels.
        artifact, device, coder, exact_dtype: the default member's (``artifact`` names the
            model and shape; blobs carry each member's own id).
        takes_device_blobs: every member decodes blobs held in device memory.

    Raises:
        MixtureError: no member, two members of one artifact, or members of other models,
            KV shapes, target ratios or devices.
    """

    def __init__(self, members: Sequence[Codec], names: Sequence[str] | None = None) -> None:
        members = list(members)
        if not members:
            raise MixtureError("a codec mixture needs at least one member")
        first = members[0].artifact
        seen: set[str] = set()
        for m in members:
            a = m.artifact
            what = f"member {a.artifact_id} ({a.calibration.get('corpus')})"
            if a.artifact_id in seen:
                raise MixtureError(f"{what} is given twice")
            seen.add(a.artifact_id)
            if a.model_fingerprint != first.model_fingerprint:
                raise MixtureError(
                    f"{what} is for model {a.model_fingerprint[:12]}, the default for "
                    f"{first.model_fingerprint[:12]}"
                )
            if tuple(a.kv_shape) != tuple(first.kv_shape):
                raise MixtureError(
                    f"{what} has KV shape {tuple(a.kv_shape)}, the default {tuple(first.kv_shape)}"
                )
            if a.target_ratio != first.target_ratio:
                raise MixtureError(
                    f"{what} targets ratio {a.target_ratio:g}, the default "
                    f"{first.target_ratio:g}: a mixture chooses among codecs of one ratio"
                )
            if torch.device(m.device) != torch.device(members[0].device):
                raise MixtureError(f"{what} runs on {m.device}, the default on {members[0].device}")
        if names is None:
            names = [
                m.artifact.calibration.get("corpus") or m.artifact.artifact_id for m in members
            ]
        if len(names) != len(members):
            raise MixtureError(f"{len(names)} names for {len(members)} members")
        self.members = members
        self.names = list(names)
        self.artifact = first
        self.device = members[0].device
        self.coder = getattr(members[0], "coder", None)
        self.exact_dtype = getattr(members[0], "exact_dtype", "bfloat16")
        self.takes_device_blobs = all(getattr(m, "takes_device_blobs", False) for m in members)
        self._by_id = {m.artifact.artifact_id: j for j, m in enumerate(members)}
        self._lock = threading.Lock()
        self._chosen = [0] * len(members)

    # -- counters -------------------------------------------------------------------------

    @property
    def chosen(self) -> list[int]:
        """Chunks encoded so far with each member (in member order)."""
        with self._lock:
            return list(self._chosen)

    def chosen_by_artifact(self) -> list[tuple[str, str, int]]:
        """``(artifact id, name, chunks chosen)`` per member, in member order."""
        with self._lock:
            counts = list(self._chosen)
        return [(m.artifact.artifact_id, n, c) for m, n, c in zip(self.members, self.names, counts)]

    # -- headers --------------------------------------------------------------------------

    def codec_for(self, header: BlobHeader) -> Codec:
        """The member whose artifact wrote a blob, by its header.

        Raises:
            CodecMismatchError: another model, or an artifact no member holds.
        """
        return self.members[self._index_of(header)]

    def _index_of(self, header: BlobHeader) -> int:
        if header.model != self.artifact.model_fingerprint:
            raise CodecMismatchError(
                f"blob is for model {header.model[:12]}, this codec mixture for "
                f"{self.artifact.model_fingerprint[:12]} ({self.artifact.model_name})"
            )
        j = self._by_id.get(header.artifact_id)
        if j is None:
            raise CodecMismatchError(
                f"blob was written by codec artifact {header.artifact_id} (version "
                f"{header.artifact_version}), none of this mixture's: {', '.join(self._by_id)}"
            )
        return j

    def check_header(self, header: BlobHeader) -> None:
        """Raise unless a member's artifact wrote the blob (for this model).

        Raises:
            CodecMismatchError: another model, or an artifact no member holds.
        """
        self.codec_for(header).check_header(header)

    # -- the protocol ---------------------------------------------------------------------

    @torch.no_grad()
    def encode_batch(self, chunks: ChunkBatch) -> list[bytes]:
        """Compress ``B`` chunks, each with the member that reconstructs it best (the
        protocol's :meth:`~.protocol.Codec.encode_batch`; module doc for the criterion).

        Args:
            chunks: ``B`` chunks of ``(L, H, T, D)`` (dense or pages), any float dtype.

        Returns:
            One blob per chunk, in order, each written by one member (its header names
            which).

        Raises:
            ValueError: ``(L, H, D)`` is not the artifact's.
        """
        kv = chunks.kv
        if kv.batch == 0:
            return []
        candidates = [m.encode_batch(chunks) for m in self.members]
        if len(self.members) == 1:
            best = [0] * kv.batch
        else:
            if kv.is_dense:
                keys, values = kv.keys.dense, kv.values.dense
            else:
                keys, values = kv.read(list(range(kv.batch)), torch.arange(kv.tokens))
            errors = []
            for m, blobs in zip(self.members, candidates):
                got = m.decode_batch(blobs, dtype=kv.dtype)
                if got.error is not None:  # a member cannot read its own blob: a bug
                    raise got.error
                errors.append(normalised_errors(got.keys, got.values, keys, values))
            best = torch.stack(errors).argmin(dim=0).tolist()  # ties: the first member
        with self._lock:
            for j in best:
                self._chosen[j] += 1
        return [candidates[j][b] for b, j in enumerate(best)]

    @torch.no_grad()
    def decode_batch(self, blobs, out: ChunkKV | None = None, *, dtype=None,
                     expect=None) -> DecodedBatch:  # fmt: skip
        """Decompress chunks of equal ``T`` into ``out``, the blobs of each member in one
        batch with that member, each into its own chunk of ``out`` (the protocol's
        :meth:`~.protocol.Codec.decode_batch`: the prefix rule, ``out``, ``dtype`` and
        ``expect`` as there).

        Returns:
            :class:`~.protocol.DecodedBatch`: the prefix decoded and the error that ended
            it; a blob of an artifact no member holds ends it with
            :class:`~kvtc_store.errors.CodecMismatchError` (headers are all read before
            anything is decoded). When a payload fails to decode, the other members'
            groups may already have written chunks past the prefix in ``out``: ``count``
            says which chunks hold data (an engine recomputes the rest).

        Raises:
            ValueError: blobs of different token counts, or an ``out`` that does not fit.
        """
        blobs = list(blobs)
        n, error = len(blobs), None
        if expect is not None:
            n, error = bound_prefix(blobs, expect)
        owner: list[int] = []
        headers: list[BlobHeader] = []
        for i in range(n):
            try:
                header = unpack_blob_header(blobs[i])[0]
                owner.append(self._index_of(header))
            except BlobError as exc:
                n, error = i, exc
                break
            except Exception as exc:  # noqa: BLE001 - a checksummed header that lies
                n, error = i, BlobCorruptError(f"blob does not decode: {exc}")
                break
            headers.append(header)
        tokens = headers[0].shape[3] if headers else 0
        if any(h.shape[3] != tokens for h in headers):
            raise ValueError("decode_batch needs chunks of equal token count")
        layers, heads, dim = self.artifact.kv_shape
        if out is None:
            if dtype is None:
                dtype = DTYPES.get(headers[0].dtype, torch.float32) if headers else torch.bfloat16
            shape = (len(blobs), layers, heads, tokens, dim)
            out = ChunkKV.dense(*(torch.empty(shape, dtype=dtype, device=self.device)
                                  for _ in "kv"))  # fmt: skip
        elif n:
            out.check(layers, heads, dim, n, tokens)
        firsts: list[int | None] = [None] * n
        count = n
        for j, member in enumerate(self.members):
            idx = [i for i in range(n) if owner[i] == j]
            if not idx:
                continue
            if len(idx) == len(blobs) and n == len(blobs):  # one member: hand it all
                return member.decode_batch(blobs, out, dtype=dtype)
            got = member.decode_batch([blobs[i] for i in idx], out.select(idx), dtype=dtype)
            for i, first in zip(idx, got.first_positions):
                firsts[i] = first
            if got.error is not None and got.count < len(idx) and idx[got.count] < count:
                count, error = idx[got.count], got.error
        return DecodedBatch(out, [int(f) for f in firsts[:count]], count, error)


def normalised_errors(
    dec_keys: torch.Tensor, dec_values: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """Each chunk's reconstruction error relative to its energy, K and V summed.

    Args:
        dec_keys, dec_values: ``(B, L, H, T, D)`` decoded chunks (any float dtype).
        keys, values: ``(B, L, H, T, D)`` the chunks as given (any float dtype, any device:
            moved to the decoded ones').

    Returns:
        float32 ``(B,)`` on the CPU: ``sum((K' - K)^2) / sum(K^2) + sum((V' - V)^2) /
        sum(V^2)`` per chunk, sums in float32 (energies clamped at 1e-30), one chunk at a
        time (no float32 copy of the whole batch).
    """
    out = torch.empty(dec_keys.shape[0], dtype=torch.float32)
    for b in range(dec_keys.shape[0]):
        e = dec_keys.new_zeros((), dtype=torch.float32)
        for dec, ref in ((dec_keys[b], keys[b]), (dec_values[b], values[b])):
            r = ref.to(dec.device, torch.float32)
            e = e + (dec.float() - r).pow(2).sum() / r.pow(2).sum().clamp_min(1e-30)
        out[b] = e.cpu()
    return out
