"""GPU tier: encoded blobs in device memory, evicted under a byte cap (LRU or S3-FIFO).

The hot set of a serving engine: chunks it is about to load again stay on the GPU
that decodes them, so a hit costs no host-to-device transfer of the blob. Each blob is
one 1-D ``torch.uint8`` tensor on the device; the policies, byte accounting, counters
and locking are :class:`~kvtc_store.backends.MemoryBackend`'s (this class only says
where a value lives).

Transfers are batched: a ``put`` packs the batch into one (pinned, on CUDA) host buffer
and copies it to the device in one transfer, then gives each chunk its own device
tensor (so an evicted chunk's memory is freed on its own); a ``get`` gathers the hits
on the device and copies them back in one transfer. :meth:`GPUBackend.get_device` hands
the hits out where they are instead (:class:`DeviceBlob`: the device tensor, plus a host
copy of its first bytes kept since the put), so that a codec on that device decodes
them with no host round trip.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvtc_store.errors import ConfigError

from .memory import EvictionPolicy, MemoryBackend

__all__ = ["DeviceBlob", "GPUBackend"]

HEAD_BYTES = 4096
"""Bytes of each blob's start kept in host memory beside its device copy (a blob's prefix
and header, which a decoder reads on the host, are a few hundred bytes)."""

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceBlob:
    """A blob in device memory, as :meth:`GPUBackend.get_device` returns it.

    Attributes:
        data: the whole blob, 1-D ``torch.uint8`` on the tier's device (the tier's own
            tensor: read it, never write it).
        head: a host copy of its first :data:`HEAD_BYTES` bytes (all of a shorter blob).
    """

    data: torch.Tensor
    head: bytes

    def __len__(self) -> int:
        return int(self.data.numel())

    def __bytes__(self) -> bytes:
        """The blob copied to the host."""
        return self.data.cpu().numpy().tobytes()


class GPUBackend(MemoryBackend):
    """Device-memory tier: blobs as ``uint8`` tensors on ``device``, capped in bytes.

    Same contract as :class:`~kvtc_store.backends.MemoryBackend` (bytes in, bytes out;
    the cap counts blob bytes, not the allocator's rounding).

    Args:
        capacity_bytes: Byte cap of the stored blobs.
        device: A torch device: ``"cuda"``, ``"cuda:1"``, ... ``"cpu"`` runs the same
            code with host tensors (how the tier is tested on machines without CUDA).
        policy: ``"lru"`` (default) or ``"s3fifo"``.

    Raises:
        ConfigError: CUDA is asked for and not available (no device, or a torch built
            without CUDA), the device index does not exist, the device string is not a
            torch device, or a capacity/policy error as for ``MemoryBackend``.
    """

    name = "gpu"

    def __init__(
        self, capacity_bytes: int, device: str = "cuda", policy: EvictionPolicy = "lru"
    ) -> None:
        super().__init__(capacity_bytes, policy)
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"gpu tier: {device!r} is not a torch device: {e}") from e
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(
                    f"gpu tier: device {device!r} asked for, but CUDA is not available "
                    f"(torch {torch.__version__}, cuda {torch.version.cuda})"
                )
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ConfigError(
                    f"gpu tier: device {device!r} does not exist "
                    f"({torch.cuda.device_count()} CUDA devices)"
                )
        self.device = dev
        self._pin = dev.type == "cuda"

    def _to_stored(self, values: list[bytes]) -> list[Any]:
        """One host-to-device copy of the whole batch, then one device tensor per blob."""
        sizes = [len(v) for v in values]
        host = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=self._pin)
        flat = host.numpy()
        offset = 0
        for v, n in zip(values, sizes):
            flat[offset : offset + n] = np.frombuffer(v, dtype=np.uint8)
            offset += n
        staged = host.to(self.device)
        out, offset = [], 0
        for v, n in zip(values, sizes):
            head = bytes(memoryview(v)[:HEAD_BYTES])
            out.append(DeviceBlob(staged[offset : offset + n].clone(), head))
            offset += n
        return out

    def get_device(self, keys) -> list[DeviceBlob | None]:
        """As :meth:`get`, the hits handed out where they are (:class:`DeviceBlob`: no
        device-to-host copy; counted and promoted as by :meth:`get`).

        Raises:
            ValueError: a key is malformed.
        """
        return self._get(keys, list)

    def _from_stored(self, stored: list[Any]) -> list[bytes]:
        """Gather on the device, one device-to-host copy, then split into bytes."""
        tensors = [b.data for b in stored]
        gathered = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
        host = torch.empty(gathered.numel(), dtype=torch.uint8, pin_memory=self._pin)
        host.copy_(gathered)
        view = memoryview(host.numpy())
        out, offset = [], 0
        for t in tensors:
            out.append(bytes(view[offset : offset + t.numel()]))
            offset += t.numel()
        return out
