"""Progress of the budget search's stages."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from typing import Any


class LogLines:
    """Progress as plain log lines on stderr: each stage's start and end, and about every fifth of it, with
    the elapsed time (what a redirected run shows instead of a live bar)."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream
        self.start = time.perf_counter()
        self.last: dict[str, int] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        step = max(total // 5, 1)
        if done == 0 or done >= total or done - self.last.get(stage, 0) >= step:
            self.last[stage] = done
            stream = self.stream or sys.stderr
            stream.write(f"[{time.perf_counter() - self.start:7.1f} s] {stage}: {done}/{total}\n")
            stream.flush()


class Reporter:
    """Stages with a total: a rich progress bar (``progress=True``), a callback ``(stage, done, total)``,
    an existing ``rich.progress.Progress``, or nothing."""

    def __init__(self, progress: Any) -> None:
        self.callback: Callable[[str, int, int], None] | None = None
        self.bar = None
        self._own = False
        if progress is True and not sys.stderr.isatty():
            # redirected (CI logs, nohup, | tee): a live bar draws nothing there; log lines instead
            self.callback = LogLines()
        elif progress is True:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=Console(stderr=True), transient=False,
            )
            self._own = True
        elif hasattr(progress, "add_task"):
            self.bar = progress
        elif callable(progress):
            self.callback = progress

    def __enter__(self) -> Reporter:
        if self.bar is not None and self._own:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None and self._own:
            self.bar.__exit__(*exc)

    @contextlib.contextmanager
    def stage(self, name: str, total: int):
        done = [0]
        task = self.bar.add_task(name, total=total) if self.bar is not None else None

        def advance(n: int = 1, total_now: int | None = None) -> None:
            done[0] += n
            if task is not None:
                self.bar.update(task, advance=n, **({"total": total_now} if total_now is not None else {}))
            if self.callback is not None:
                self.callback(name, done[0], total_now if total_now is not None else total)

        if self.callback is not None:
            self.callback(name, 0, total)
        try:
            yield advance
        finally:
            if task is not None:
                t = self.bar.tasks[[x.id for x in self.bar.tasks].index(task)]
                self.bar.update(task, completed=t.total)
