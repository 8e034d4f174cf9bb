"""Progress: a rich bar on a terminal, a plain log line every few seconds otherwise."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

log = logging.getLogger("stride.build")


class Reporter(Protocol):
    def advance(self, n: int = 1, **stats: float) -> None: ...


class _Silent:
    def advance(self, n: int = 1, **stats: float) -> None:
        pass


class _LogLines:
    def __init__(self, what: str, total: int, done: int, unit: str, every_s: float):
        self.what, self.total, self.done, self.unit, self.every = what, total, done, unit, every_s
        self.start = self.last = time.monotonic()
        self.start_done = done

    def advance(self, n: int = 1, **stats: float) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last < self.every and self.done < self.total:
            return
        self.last = now
        rate = (self.done - self.start_done) / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        extra = " ".join(f"{k}={v:.4g}" for k, v in stats.items())
        log.info("%s %d/%d %s (%.1f %s/s, eta %.0fs) %s", self.what, self.done, self.total,
                 self.unit, rate, self.unit, eta, extra)


class _RichBar:
    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def advance(self, n: int = 1, **stats: float) -> None:
        info = " ".join(f"{k}={v:.3g}" for k, v in stats.items())
        self.progress.update(self.task, advance=n, info=info)


@contextmanager
def reporter(what: str, total: int, done: int = 0, unit: str = "steps", enabled: bool = True,
             every_s: float = 5.0) -> Iterator[Reporter]:
    if not enabled:
        yield _Silent()
        return
    if not sys.stderr.isatty():
        yield _LogLines(what, total, done, unit, every_s)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Speed(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed or 0:.1f} {unit}/s")

    columns = [TextColumn(what), BarColumn(), MofNCompleteColumn(), Speed(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(what, total=total, completed=done, info="")
        yield _RichBar(progress, task)
