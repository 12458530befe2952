"""`Batcher`: the server's one path to the generation engine. Requests from many connections share batches.

One worker thread owns a local engine (`Generator` is not thread-safe, and one engine call at a time is what a
CPU or a GPU serves best). Requests are queued from any thread; the worker takes the oldest, waits until it has
been queued `window_ms`, adds whatever else is queued (up to `max_batch`) and answers them all with one engine
call. A request queued while the engine is busy waits for the current call and goes into the next one, so under
load batches form by themselves. A remote engine (the openai backend) gets several workers, each sending its own
batch, since such a server batches what it receives on its own.

Requests that arrive together reach the queue one by one: the server reads each with the safety guard first
(tens of milliseconds each). So the server `announce`s a request when it arrives, and the worker, before starting
a batch, waits while announced requests are still on their way (at most `max_wait_ms` after the oldest queued
one). Without that, the first of sixteen simultaneous requests ran alone and the fifteen others after it.

Streaming. A batch with streamed requests is run with `Generator.generate_stream`: each streamed request gets its
text as the engine decodes it (the transformers engine passes every row's new text on at each step), whether it
is alone or shares the batch; the others get their text whole at the end. Backends that cannot stream a batch
pass each reply whole when it is done.

A request whose client went away is cancelled: still queued, it leaves the queue without being generated; inside
a running batch, its row stops generating at the next step (`cancelled` of `generate_stream`) while the others go
on; backends that cannot stop one row finish it and its reply is dropped.

`call(fn)` runs `fn(generator)` on the worker, alone (profile inference: its batched reflection call).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from esc_evolve.generation.types import GenerationRequest, GenerationResult, Generator

log = logging.getLogger(__name__)

_END = object()  # end of a job's pieces
_STOP = object()  # the worker's signal to finish


class BatcherClosed(RuntimeError):
    """The batcher was stopped before the request was served."""


class Job:
    """One queued unit of work: a generation request (its pieces and result), or a call on the engine."""

    def __init__(self, request: GenerationRequest | None, *, stream: bool = False, fn: Callable | None = None):
        self.request = request
        self.stream = stream
        self.fn = fn
        self.queued_at = time.monotonic()
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._pieces: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._result: Any = None
        self._error: BaseException | None = None
        self.sent = False  # some of the reply was handed to the caller

    # Caller side ----------------------------------------------------------------------------------------
    def cancel(self) -> None:
        """The caller is gone: leave the queue, or stop streaming; a running batch finishes without it."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def pieces(self) -> Iterator[str]:
        """The reply's text as the engine produces it (blocking): token pieces when the request was streamed
        alone, the whole text at once when it shared a batch. Raises the engine's error, if any."""
        while (piece := self._pieces.get()) is not _END:
            yield piece
        if self._error is not None:
            raise self._error

    def result(self, timeout: float | None = None) -> Any:
        """The `GenerationResult` (or `fn`'s return value), blocking until there is one."""
        if not self._done.wait(timeout):
            raise TimeoutError("the engine did not answer in time")
        if self._error is not None:
            raise self._error
        return self._result

    # Worker side ----------------------------------------------------------------------------------------
    def _piece(self, text: str) -> None:
        self.sent = True
        self._pieces.put(text)

    def _finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._pieces.put(_END)
        self._done.set()


class Batcher:
    """Queue requests from any thread; worker threads answer them in batches (module docstring).

    `workers` is 1 for an engine in this process (one engine call at a time). A remote engine that batches on
    its own (the openai backend: vLLM, TGI, llama.cpp servers) can take several calls at once: give it as many
    workers as requests it should see in flight, so that one slow batch does not hold the others back.
    """

    def __init__(
        self,
        generator: Generator,
        *,
        window_ms: float = 5.0,
        max_batch: int = 16,
        workers: int = 1,
        max_wait_ms: float = 500.0,
    ):
        if max_batch < 1 or workers < 1:
            raise ValueError("max_batch and workers must be >= 1")
        self.generator = generator
        self.window = max(0.0, window_ms) / 1000.0
        self.max_wait = max(self.window, max_wait_ms / 1000.0)
        self._announced = 0
        self._announced_lock = threading.Lock()
        self.max_batch = max_batch
        self.workers = workers
        self.batch_sizes: list[int] = []  # requests per engine call, in order (tests, benchmarks)
        self._queue: queue.Queue[Any] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._closed = False

    # Lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> Batcher:
        if not self._threads:
            self._closed = False
            for i in range(self.workers):
                thread = threading.Thread(target=self._work, name=f"esc-evolve-engine-{i}", daemon=True)
                thread.start()
                self._threads.append(thread)
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Refuse new work, fail what is still queued, and let the workers finish the engine calls they are in."""
        self._closed = True
        for _ in self._threads:
            self._queue.put(_STOP)
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []

    @property
    def queued(self) -> int:
        """Requests waiting for the engine (not counting the ones it is computing)."""
        return self._queue.qsize()

    # Submitting (any thread) ---------------------------------------------------------------------------
    def announce(self) -> Callable[[], None]:
        """Say that a request is on its way (it arrived and is being checked before it can be submitted); the
        worker waits for announced requests, up to `max_wait_ms` after the oldest queued one, so that requests
        arriving together share one engine call instead of the first running alone. Returns the release (call
        it once the request is submitted or will never be; calling it again does nothing)."""
        with self._announced_lock:
            self._announced += 1
        released = threading.Event()

        def release() -> None:
            with self._announced_lock:
                if not released.is_set():
                    released.set()
                    self._announced -= 1

        return release

    def submit(
        self, request: GenerationRequest, *, stream: bool = False, announced: Callable[[], None] | None = None
    ) -> Job:
        """Queue `request`; read the reply with `job.result()` or, streamed, `job.pieces()`. `announced`: the
        release `announce` gave for this request."""
        job = self._put(Job(request, stream=stream))
        if announced is not None:
            announced()
        return job

    def call(self, fn: Callable[[Generator], Any]) -> Job:
        """Queue `fn(generator)`, run on a worker between batches; its return value is `job.result()`."""
        return self._put(Job(None, fn=fn))

    def _put(self, job: Job) -> Job:
        if self._closed:
            raise BatcherClosed("the server is shutting down")
        self._queue.put(job)
        return job

    # The workers ---------------------------------------------------------------------------------------
    def _work(self) -> None:
        held: list[Job] = []  # calls taken from the queue while a batch was being formed: they run next
        while True:
            first = held.pop(0) if held else self._queue.get()
            if first is _STOP:
                break
            if first.fn is not None:
                self._run_call(first)
                continue
            self._wait_for_company(first)
            batch, stop = self._form_batch(first, held)
            live = [job for job in batch if not job.cancelled]
            for job in batch:
                if job.cancelled:
                    job._finish(error=BatcherClosed("cancelled before it was served"))
            if live:
                self._run_batch(live)
            if stop:
                break
        for job in held:
            job._finish(error=BatcherClosed("the server is shutting down"))
        self._fail_queued()

    def _wait_for_company(self, first: Job) -> None:
        """Wait until `first` has been queued `window`, and while requests announced but not yet submitted may
        still join its batch (at most `max_wait` after it was queued)."""
        while self._queue.qsize() < self.max_batch - 1:
            waited = time.monotonic() - first.queued_at
            if waited >= self.max_wait or (waited >= self.window and self._announced <= 0):
                return
            time.sleep(min(0.002, max(self.window - waited, 0.0005)))

    def _form_batch(self, first: Job, held: list[Job]) -> tuple[list[Job], bool]:
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return batch, False
            if job is _STOP:
                return batch, True
            if job.fn is not None:
                held.append(job)  # a call runs alone, after this batch
            else:
                batch.append(job)
        return batch, False

    def _run_call(self, job: Job) -> None:
        if job.cancelled:
            job._finish(error=BatcherClosed("cancelled before it ran"))
            return
        try:
            job._finish(job.fn(self.generator))
        except Exception as exc:  # handed to the caller, who decides what it means
            job._finish(error=exc)

    def _run_batch(self, jobs: list[Job]) -> None:
        self.batch_sizes.append(len(jobs))
        try:
            results = self._generate(jobs)
        except Exception as exc:
            if len(jobs) == 1 or any(job.sent for job in jobs):
                for job in jobs:
                    job._finish(error=exc)
                return
            # One request the engine refuses (too long for the model...) must not fail the others with it.
            log.info("a batch of %d failed (%s); answering its requests one by one", len(jobs), exc)
            for job in jobs:
                self._run_batch([job])
            return
        for job, result in zip(jobs, results, strict=True):
            if not job.stream:
                job._piece(result.text)
            job._finish(result)

    def _generate(self, jobs: list[Job]) -> list[GenerationResult]:
        """One engine call for `jobs`; streamed jobs get their text as the engine decodes it."""
        if not any(job.stream for job in jobs):
            return self.generator.generate([job.request for job in jobs], progress=False)

        def on_text(index: int, piece: str) -> None:
            if jobs[index].stream:
                jobs[index]._piece(piece)

        requests = [job.request for job in jobs]
        return self.generator.generate_stream(requests, on_text, cancelled=lambda index: jobs[index].cancelled)

    def _fail_queued(self) -> None:
        """Fail the jobs still queued at shutdown (the other workers' stop signals stay queued for them)."""
        stops = 0
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                stops += 1
            else:
                job._finish(error=BatcherClosed("the server is shutting down"))
        for _ in range(stops):
            self._queue.put(_STOP)
