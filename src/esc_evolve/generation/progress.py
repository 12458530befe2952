"""A progress bar for generation: requests done, generated tokens per second, time left. Written to stderr so
that a command's output stays clean when piped."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class GenerationProgress:
    """`with GenerationProgress(n, enabled) as bar: bar.advance(requests, tokens)`; a no-op when disabled."""

    def __init__(self, total: int, enabled: bool = True, description: str = "generating") -> None:
        self.total = total
        self.tokens = 0
        self.start = time.perf_counter()
        self._progress: Progress | None = None
        if enabled and total > 0:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("requests  {task.fields[rate]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._task = self._progress.add_task(description, total=total, rate="")

    def __enter__(self) -> GenerationProgress:
        self.start = time.perf_counter()
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)

    def advance(self, requests: int, tokens: int) -> None:
        self.tokens += tokens
        if self._progress is not None:
            rate = f"{self.tokens} tokens, {self.tokens_per_second:.1f} tok/s"
            self._progress.update(self._task, advance=requests, rate=rate)
