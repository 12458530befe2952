"""`Batcher`: the server's one path to the generation engine. Requests from many connections share batches.

One worker thread owns a local engine (`Generator` is not thread-safe, and one engine call at a time is what a
CPU or a GPU serves best). Requests are queued from any thread; the worker takes the oldest, waits until it has
been queued `window_ms`, adds whatever else is queued (up to `max_batch`) and answers them all with one
`Generator.generate` call. A request queued while the engine is busy waits for the current call and goes into
the next one, so under load batches form by themselves. A remote engine (the openai backend) gets several
workers, each sending its own batch, since such a server batches what it receives on its own.

Streaming. The engine streams one request at a time (`Generator.stream`), so:
- a streamed request that has the engine to itself (nothing else queued when its turn comes) is streamed token by
  token from the engine;
- streamed requests that arrive together are generated in one batch like any others, and each one's text is sent
  on when its batch is done (the stream then carries the whole reply at once).
So one person chatting sees tokens as they are produced; under load, time to first token becomes the batch's
latency, and throughput is the batched engine's.

A request whose client went away is cancelled: still queued, it leaves the queue without being generated; being
streamed alone, its engine stream is closed (the engine finishes the token it is computing; `Generator.stream`
implementations may run to the end of the reply before returning, see hf.py). A cancelled request inside a
running batch is finished with the batch and its reply dropped.

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

    def __init__(self, generator: Generator, *, window_ms: float = 5.0, max_batch: int = 16, workers: int = 1):
        if max_batch < 1 or workers < 1:
            raise ValueError("max_batch and workers must be >= 1")
        self.generator = generator
        self.window = max(0.0, window_ms) / 1000.0
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
    def submit(self, request: GenerationRequest, *, stream: bool = False) -> Job:
        """Queue `request`; read the reply with `job.result()` or, streamed, `job.pieces()`."""
        return self._put(Job(request, stream=stream))

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
            wait = self.window - (time.monotonic() - first.queued_at)
            if wait > 0 and self._queue.qsize() < self.max_batch - 1:
                time.sleep(wait)
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
        if len(jobs) == 1 and jobs[0].stream:
            self._stream_alone(jobs[0])
            return
        try:
            results = self.generator.generate([job.request for job in jobs], progress=False)
        except Exception as exc:
            if len(jobs) == 1:
                jobs[0]._finish(error=exc)
                return
            # One request the engine refuses (too long for the model...) must not fail the others with it.
            log.info("a batch of %d failed (%s); answering its requests one by one", len(jobs), exc)
            for job in jobs:
                self._one(job)
            return
        for job, result in zip(jobs, results, strict=True):
            job._piece(result.text)
            job._finish(result)

    def _one(self, job: Job) -> None:
        try:
            (result,) = self.generator.generate([job.request], progress=False)
        except Exception as exc:
            job._finish(error=exc)
            return
        job._piece(result.text)
        job._finish(result)

    def _stream_alone(self, job: Job) -> None:
        pieces = self.generator.stream(job.request)
        text: list[str] = []
        try:
            for piece in pieces:
                if job.cancelled:
                    break
                text.append(piece)
                job._piece(piece)
        except Exception as exc:
            job._finish(error=exc)
            return
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
        job._finish(self._streamed_result(job.request, "".join(text)))

    def _streamed_result(self, request: GenerationRequest, text: str) -> GenerationResult:
        """What `Generator.stream` does not report, estimated: tokens by re-encoding the text (where the engine
        has a tokenizer), `length` when that reaches the request's budget."""
        tokenizer = self.generator.tokenizer
        tokens = len(tokenizer.encode(text, add_special_tokens=False)) if tokenizer is not None and text else 0
        budget = request.max_new_tokens or getattr(getattr(self.generator, "config", None), "max_new_tokens", None)
        finish = "length" if budget and tokens >= budget else "stop"
        return GenerationResult(text=text, num_tokens=tokens, finish_reason=finish, request_id=request.id)

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
