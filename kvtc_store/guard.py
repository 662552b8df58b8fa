"""Deadlines and circuit breakers for tier calls: a silent tier never stalls the store.

DESIGN.md, "Reliability rules". Every call the tier stack makes to a tier goes through
that tier's :class:`TierGuard`:

- **deadline**: a tier with ``deadline_s`` set (disk and S3 by default) is called on the
  guard's own worker threads and waited for at most ``deadline_s`` seconds; past it the
  call counts as failed (:class:`TierTimeoutError`) and the caller goes on. The worker
  finishes (or times out in the client: boto3's own connect/read timeouts) in the
  background. In-process memory tiers (``deadline_s=None``) are called directly: they
  never wait on I/O.
- **circuit breaker** (closed → open → half-open): ``failures`` consecutive failed or
  timed-out calls open it; while open, calls fail at once (:class:`TierUnavailableError`)
  without touching the tier; after ``backoff_s`` one probe call is let through
  (half-open): its success closes the breaker, its failure opens it again for twice the
  back-off (up to ``max_backoff_s``).

Pattern: M. Nygard, *Release It!* (2nd ed., 2018), "Circuit Breaker" and "Timeouts".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ConfigError, StoreError

__all__ = [
    "BreakerSettings",
    "CircuitBreaker",
    "TierGuard",
    "TierTimeoutError",
    "TierUnavailableError",
]

BreakerState = Literal["closed", "open", "half-open"]


class TierTimeoutError(StoreError):
    """A tier call did not answer within the tier's deadline."""


class TierUnavailableError(StoreError):
    """A tier's circuit breaker is open: the call was not sent."""


@dataclass(frozen=True)
class BreakerSettings:
    """Circuit-breaker settings of every tier of a store.

    Attributes:
        failures: consecutive failed calls that open the breaker (>= 1).
        backoff_s: seconds the breaker stays open the first time (> 0).
        max_backoff_s: most seconds it stays open after repeated failed probes.
    """

    failures: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.failures, bool) or not isinstance(self.failures, int):
            raise ConfigError(f"breaker failures must be an int >= 1, got {self.failures!r}")
        if self.failures < 1 or not self.backoff_s > 0 or self.max_backoff_s < self.backoff_s:
            raise ConfigError(
                f"breaker needs failures >= 1 and 0 < backoff_s <= max_backoff_s, got {self}"
            )


class CircuitBreaker:
    """One tier's breaker (thread-safe). :meth:`allow` before a call, then
    :meth:`succeeded` or :meth:`failed` after it."""

    def __init__(self, settings: BreakerSettings | None = None, clock=time.monotonic) -> None:
        self.settings = settings or BreakerSettings()
        self._clock = clock
        self._lock = threading.Lock()
        self._state: BreakerState = "closed"
        self._failures = 0
        self._backoff = self.settings.backoff_s
        self._open_until = 0.0
        self._probing = False
        self.opened = 0  # times it opened

    @property
    def state(self) -> BreakerState:
        """``closed``, ``open`` or ``half-open`` (an open breaker past its back-off reads
        half-open: the next call is the probe)."""
        with self._lock:
            if self._state == "open" and self._clock() >= self._open_until:
                return "half-open"
            return self._state

    def allow(self) -> bool:
        """Whether a call may go to the tier now (closed; or the one probe of half-open)."""
        with self._lock:
            if self._state == "closed":
                return True
            if self._state == "open" and self._clock() >= self._open_until:
                self._state = "half-open"
            if self._state == "half-open" and not self._probing:
                self._probing = True
                return True
            return False

    def succeeded(self) -> None:
        with self._lock:
            self._state, self._failures, self._probing = "closed", 0, False
            self._backoff = self.settings.backoff_s

    def failed(self) -> None:
        with self._lock:
            self._failures += 1
            if self._state == "half-open":
                self._backoff = min(2 * self._backoff, self.settings.max_backoff_s)
            elif self._failures < self.settings.failures:
                return
            self._state, self._probing = "open", False
            self._open_until = self._clock() + self._backoff
            self.opened += 1


class TierGuard:
    """Runs one tier's calls under its deadline and circuit breaker.

    Args:
        name: the tier's name (in errors).
        deadline_s: most seconds a call is waited for; None: call directly, no deadline.
        breaker: settings of the tier's breaker.
        workers: threads that run calls with a deadline (calls stuck past their deadline
            hold one each until the client gives up; when all are held, new calls wait in
            the queue and time out, which opens the breaker).
    """

    def __init__(
        self,
        name: str,
        deadline_s: float | None,
        breaker: BreakerSettings | None = None,
        workers: int = 8,
    ) -> None:
        if deadline_s is not None and not deadline_s > 0:
            raise ConfigError(f"tier {name}: deadline must be > 0 seconds, got {deadline_s}")
        self.name = name
        self.deadline_s = deadline_s
        self.breaker = CircuitBreaker(breaker)
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.timeouts = 0
        self._running = 0  # calls with a deadline started and not yet returned

    def call(self, op: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` within the deadline, unless the breaker is open.

        Raises:
            TierUnavailableError: the breaker is open (nothing was sent).
            TierTimeoutError: no answer within ``deadline_s`` seconds.
            Exception: what ``fn`` raised (the breaker counts it as a failure).
        """
        if not self.breaker.allow():
            raise TierUnavailableError(
                f"tier {self.name}: {op} not sent, the tier's circuit breaker is open"
            )
        try:
            if self.deadline_s is None:
                result = fn(*args)
            else:
                result = self._within_deadline(op, fn, args)
        except BaseException:
            self.breaker.failed()
            raise
        self.breaker.succeeded()
        return result

    def _within_deadline(self, op: str, fn: Callable[..., Any], args: tuple) -> Any:
        job: Future = self._executor().submit(self._run, fn, args)
        try:
            return job.result(timeout=self.deadline_s)
        except FutureTimeout:
            with self._lock:
                self.timeouts += 1
            raise TierTimeoutError(
                f"tier {self.name}: {op} gave no answer within its deadline of "
                f"{self.deadline_s:g} s"
            ) from None

    def _run(self, fn: Callable[..., Any], args: tuple) -> Any:
        with self._lock:
            self._running += 1
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._running -= 1

    @property
    def busy(self) -> bool:
        """Whether a call is still running on the guard's threads (one past its deadline,
        stuck in the tier: closing the tier would wait for it)."""
        with self._lock:
            return self._running > 0

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self._workers, thread_name_prefix=f"kvtc-guard-{self.name}"
                )
            return self._pool

    def close(self, wait: bool = True) -> None:
        """Stop the worker threads (``wait=False``: without joining calls still stuck)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)
