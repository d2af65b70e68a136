"""Dynamic batching for tensor models.

Requests wait in a bounded queue; callbacks on the event loop form batches
(up to `max_batch_size` rows, waiting at most `max_wait_s` after the oldest
request arrived for more to come) and hand each batch to a single worker
thread, so inference never blocks the event loop. While the worker computes,
new requests pile up and form the next batch: under load batches grow by
themselves even with `max_wait_s = 0` (Triton's default too).

Only requests whose non-batch dimensions agree are stacked together. When a
stacked batch fails, each request is retried alone so that one bad request
cannot fail its neighbours.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import CancelledError, Executor, Future
from dataclasses import dataclass, field

import numpy as np

from .metrics import RuntimeMetrics

RunFn = Callable[[Mapping[str, np.ndarray], Sequence[str]], dict[str, np.ndarray]]


class QueueFull(Exception):
    """The queue is at its bound: answered with 429 and Retry-After."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the request queue is full; retry in {retry_after_s}s")
        self.retry_after_s = retry_after_s


class BatcherClosed(RuntimeError):
    pass


def retry_after_seconds(queued: int, max_batch: int, batch_seconds: float) -> int:
    """Time to drain the queue at the recent batch duration, at least one second
    (Retry-After takes whole seconds)."""
    batches = queued / max(1, max_batch) + 1
    return max(1, math.ceil(batches * batch_seconds))


@dataclass(eq=False)
class _Pending:
    inputs: Mapping[str, np.ndarray]
    outputs: Sequence[str]
    rows: int
    key: tuple[object, ...]
    future: asyncio.Future[tuple[dict[str, np.ndarray], float]]
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class BatchResult:
    outputs: dict[str, np.ndarray]
    joules: float


class TensorBatcher:
    def __init__(
        self,
        run: RunFn,
        *,
        input_names: Sequence[str],
        batchable: bool,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        executor: Executor,
        metrics: RuntimeMetrics,
    ) -> None:
        self._run = run
        self._input_names = list(input_names)
        self._batchable = batchable and max_batch_size > 1
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._executor = executor
        self._metrics = metrics
        self._queue: deque[_Pending] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False  # a batch is with the worker
        self._closed = False
        self._batch_seconds = 0.01  # running average, for Retry-After

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._dispatch()

    async def stop(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(BatcherClosed("the runtime is shutting down"))

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def infer(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> BatchResult:
        if self._closed:
            raise BatcherClosed("the runtime is shutting down")
        if len(self._queue) >= self.max_queue:
            raise QueueFull(
                retry_after_seconds(len(self._queue), self.max_batch_size, self._batch_seconds)
            )
        first = inputs[self._input_names[0]]
        rows = int(first.shape[0]) if first.ndim > 0 else 1
        # Requests stack only if every input agrees on everything but dim 0.
        key = tuple((n, inputs[n].dtype.str, inputs[n].shape[1:]) for n in self._input_names)
        future: asyncio.Future[tuple[dict[str, np.ndarray], float]] = (
            asyncio.get_running_loop().create_future()
        )
        self._queue.append(_Pending(inputs, outputs, rows, key, future))
        self._dispatch()
        result, joules = await future
        return BatchResult(result, joules)

    def _compatible_rows(self, head: _Pending) -> int:
        rows = 0
        for p in self._queue:
            if p.key == head.key and not p.future.done():
                rows += p.rows
        return rows

    # Scheduling runs in plain callbacks on the event loop (on arrival, on a
    # batch's completion, on the max-wait timer) rather than in a task of its
    # own: at batch 1 each extra task step and future hop between the loop and
    # the worker thread showed up in the server's latency.

    def _dispatch(self) -> None:
        """Hand the next batch to the worker, unless one is running or the head
        may still wait for company."""
        if self._busy or self._closed or self._loop is None:
            return
        while self._queue:
            head = self._queue[0]
            if head.future.done():  # the client went away while queued
                self._queue.popleft()
                continue
            if (
                self._batchable
                and self.max_wait_s > 0
                and self._compatible_rows(head) < self.max_batch_size
            ):
                delay = head.enqueued + self.max_wait_s - time.monotonic()
                if delay > 0:
                    if self._timer is None:
                        self._timer = self._loop.call_later(delay, self._on_timer)
                    return
            batch = self._take(head)
            if batch:
                self._submit(batch)
                return

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _submit(self, batch: list[_Pending]) -> None:
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        started = time.monotonic()
        wait = self._metrics.child(self._metrics.queue_wait)
        for p in batch:
            wait.observe(started - p.enqueued)
        loop = self._loop
        try:
            work = self._executor.submit(self._compute, batch)
        except RuntimeError:  # the executor is shut down: so is the runtime
            self._closed = True
            self._finish(batch, [BatcherClosed("the runtime is shutting down")] * len(batch))
            return
        self._busy = True

        def done(work: Future[list[tuple[dict[str, np.ndarray], float] | BaseException]]) -> None:
            # In the worker thread: one wake-up of the loop answers the whole batch.
            results: Sequence[tuple[dict[str, np.ndarray], float] | BaseException]
            try:
                results = work.result()
            except CancelledError:  # the executor shut down before it ran
                results = [BatcherClosed("the runtime is shutting down")] * len(batch)
            except BaseException as exc:
                results = [exc] * len(batch)
            # RuntimeError: the loop is closed, so nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._finish, batch, results)

        work.add_done_callback(done)

    def _finish(
        self,
        batch: list[_Pending],
        results: Sequence[tuple[dict[str, np.ndarray], float] | BaseException],
    ) -> None:
        self._busy = False
        for pending, result in zip(batch, results, strict=True):
            if pending.future.done():
                continue
            if isinstance(result, BaseException):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)
        self._dispatch()

    def _take(self, head: _Pending) -> list[_Pending]:
        """Remove and return the next batch: the head plus compatible followers, in order."""
        if not self._batchable or head.rows >= self.max_batch_size:
            self._queue.popleft()
            return [head]
        batch: list[_Pending] = []
        rows = 0
        keep: deque[_Pending] = deque()
        while self._queue:
            p = self._queue.popleft()
            if p.future.done():
                continue
            if p.key == head.key and rows + p.rows <= self.max_batch_size:
                batch.append(p)
                rows += p.rows
            else:
                keep.append(p)
                if rows >= self.max_batch_size:
                    break
        keep.extend(self._queue)
        self._queue = keep
        return batch

    # --- worker thread -------------------------------------------------

    def _compute(
        self, batch: list[_Pending]
    ) -> list[tuple[dict[str, np.ndarray], float] | BaseException]:
        if len(batch) == 1:
            return [self._compute_one(batch[0])]
        outputs = list(dict.fromkeys(name for p in batch for name in p.outputs))
        stacked = {n: np.concatenate([p.inputs[n] for p in batch]) for n in self._input_names}
        rows = sum(p.rows for p in batch)
        try:
            result, joules = self._timed(stacked, outputs, rows)
        except Exception:
            # Find the culprit: each request alone, so only it fails.
            return [self._compute_one(p) for p in batch]
        answers: list[tuple[dict[str, np.ndarray], float] | BaseException] = []
        offset = 0
        for p in batch:
            part = {n: result[n][offset : offset + p.rows] for n in p.outputs}
            answers.append((part, joules * p.rows / rows))
            offset += p.rows
        return answers

    def _compute_one(self, p: _Pending) -> tuple[dict[str, np.ndarray], float] | BaseException:
        try:
            return self._timed(p.inputs, p.outputs, p.rows)
        except Exception as exc:  # reported to that request's caller
            return exc

    def _timed(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], rows: int
    ) -> tuple[dict[str, np.ndarray], float]:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        result = self._run(inputs, outputs)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * wall
        joules = self._metrics.observe_batch(rows, wall, cpu)
        return result, joules
