"""Dynamic batching: concurrent requests merged into one model call, run on ONE worker thread.

The server's event loop submits :class:`Job`\\ s; a single worker thread (torch is not
re-entrant for this use, and one thread keeps the loop responsive) takes the oldest
queued job, waits up to ``wait_ms`` for more jobs with the **same key** (jobs whose
sampling settings differ never share a call), and runs them together, up to
``max_batch`` rows. Results go back to each job's ``asyncio.Future`` through its loop.

- The queue is bounded: :meth:`DynamicBatcher.submit` raises :class:`QueueFullError`
  when ``queue_size`` jobs are already waiting (the server answers 429).
- :meth:`DynamicBatcher.cancel` drops a job that has not started (a timed-out or
  disconnected client); a started job is flagged so that the batch function can stop
  early once every job of its batch is cancelled (raise :class:`BatchCancelled`).
- If a merged call raises, each of its jobs is re-run alone, so one bad request fails
  only itself.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The batcher already holds ``queue_size`` waiting jobs."""


class BatchCancelled(Exception):
    """Raised by a batch function to abandon a batch whose jobs were all cancelled."""


@dataclass(frozen=True)
class BatcherConfig:
    """How requests are merged.

    - ``max_batch``: most rows (e.g. images) in one model call; 1 turns batching off.
    - ``wait_ms``: how long the oldest queued job waits for companions before its batch runs.
    - ``queue_size``: most jobs waiting (not yet running); more are refused.
    """

    max_batch: int = 16
    wait_ms: float = 20.0
    queue_size: int = 64

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (1 = no batching), got {self.max_batch}")
        if not self.wait_ms >= 0:
            raise ValueError(f"wait_ms must be >= 0, got {self.wait_ms}")
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")


@dataclass(eq=False)
class Job:
    """One request's work: ``payload`` for the batch function, ``rows`` of the batch it fills.

    ``progress`` (optional) is called from the worker thread with partial results;
    ``cancelled`` may be read there to stop early.
    """

    key: Hashable
    payload: Any
    rows: int
    future: asyncio.Future
    progress: Callable[[Any], None] | None = None
    enqueued: float = field(default_factory=time.monotonic)
    state: str = "queued"  # queued | running | done | cancelled

    @property
    def cancelled(self) -> bool:
        """True once the client is gone or timed out; the result will be discarded."""
        return self.state == "cancelled"


BatchFn = Callable[[Hashable, Sequence[Job]], Sequence[Any]]
"""``run(key, jobs) -> one result per job`` (an ``Exception`` instance fails only that job)."""


class DynamicBatcher:
    """Merge concurrent jobs with equal keys into one call of ``run`` on one worker thread."""

    def __init__(
        self,
        run: BatchFn,
        cfg: BatcherConfig = BatcherConfig(),
        *,
        on_batch: Callable[[Hashable, Sequence[Job]], None] | None = None,
        on_start: Callable[[], None] | None = None,
        name: str = "cm3leon-batcher",
    ) -> None:
        self.run = run
        self.cfg = cfg
        self.on_batch = on_batch
        self.on_start = on_start
        self.name = name
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._running: list[Job] = []

    # ---- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._worker, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Fail every queued job, let the running batch finish, and join the worker."""
        with self._cond:
            self._stopping = True
            dropped = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in dropped:
            job.state = "cancelled"
            _deliver(job, RuntimeError("the server is shutting down; retry later"))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # ---- event-loop side -----------------------------------------------------------
    def submit(self, key: Hashable, payload: Any, *, rows: int = 1,
               progress: Callable[[Any], None] | None = None) -> Job:
        """Queue a job (call from the event loop); await ``job.future`` for its result."""
        if rows < 1:
            raise ValueError(f"a job fills at least one row, got rows={rows}")
        future = asyncio.get_running_loop().create_future()
        job = Job(key=key, payload=payload, rows=rows, future=future, progress=progress)
        with self._cond:
            if self._stopping or self._thread is None:
                raise RuntimeError("the batcher is not running; call start() first")
            if len(self._pending) >= self.cfg.queue_size:
                raise QueueFullError(
                    f"the request queue is full ({self.cfg.queue_size} waiting); retry in a moment"
                )
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> bool:
        """Cancel ``job``; True if it was still queued (its work will never run)."""
        with self._cond:
            queued = job.state == "queued"
            if queued:
                try:
                    self._pending.remove(job)
                except ValueError:
                    queued = False
                self._cond.notify_all()
            if job.state in ("queued", "running"):
                job.state = "cancelled"
        if not job.future.done():
            job.future.cancel()
        return queued

    @property
    def alive(self) -> bool:
        """True while the worker thread runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        """Jobs waiting to run."""
        return len(self._pending)

    @property
    def busy_rows(self) -> int:
        """Rows of the batch running now (0 when idle)."""
        return sum(j.rows for j in self._running)

    # ---- worker side -----------------------------------------------------------------
    def _select(self, key: Hashable) -> list[Job]:
        """FIFO jobs with ``key`` that fit ``max_batch`` rows (the first always fits)."""
        batch, rows = [], 0
        for job in self._pending:
            if job.key != key:
                continue
            if batch and rows + job.rows > self.cfg.max_batch:
                continue
            batch.append(job)
            rows += job.rows
            if rows >= self.cfg.max_batch:
                break
        return batch

    def _next_batch(self) -> list[Job] | None:
        """Block until a batch is due; None when stopping."""
        wait_s = self.cfg.wait_ms / 1000.0
        with self._cond:
            while True:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return None
                first = self._pending[0]
                deadline = first.enqueued + wait_s
                while True:
                    batch = self._select(first.key)
                    remaining = deadline - time.monotonic()
                    if sum(j.rows for j in batch) >= self.cfg.max_batch or remaining <= 0 or self._stopping:
                        break
                    self._cond.wait(remaining)
                    if not self._pending or self._pending[0] is not first:
                        break  # the oldest job was cancelled meanwhile: start over
                if self._stopping:
                    return None
                if not self._pending or self._pending[0] is not first:
                    continue
                for job in batch:
                    self._pending.remove(job)
                    job.state = "running"
                self._running = batch
                return batch

    def _worker(self) -> None:
        if self.on_start is not None:
            self.on_start()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run_batch(batch)
            finally:
                with self._cond:
                    self._running = []

    def _run_batch(self, batch: list[Job]) -> None:
        key = batch[0].key
        if self.on_batch is not None:
            try:
                self.on_batch(key, batch)
            except Exception:  # metrics must never take the worker down
                log.exception("on_batch hook failed")
        try:
            results = list(self.run(key, batch))
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} jobs")
        except BatchCancelled:
            results = [asyncio.CancelledError() for _ in batch]
        except Exception as e:
            if len(batch) == 1:
                results = [e]
            else:
                log.warning("a merged batch of %d jobs failed (%s); re-running each alone", len(batch), e)
                for job in batch:
                    if not job.cancelled:
                        self._run_batch([job])
                return
        for job, result in zip(batch, results):
            if job.state == "running":
                job.state = "done"
            _deliver(job, result)


def _deliver(job: Job, result: Any) -> None:
    """Resolve ``job.future`` on its own loop (thread-safe; a closed loop or done future is ignored)."""

    def resolve() -> None:
        if job.future.done():
            return
        if isinstance(result, asyncio.CancelledError):
            job.future.cancel()
        elif isinstance(result, BaseException):
            job.future.set_exception(result)
        else:
            job.future.set_result(result)

    try:
        job.future.get_loop().call_soon_threadsafe(resolve)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass
