"""Rich progress bars and spinners for every long step, on stderr so stdout stays parseable."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


@contextmanager
def status(message: str) -> Iterator[None]:
    with console.status(message):
        yield


@contextmanager
def bar(description: str, total: int) -> Iterator[callable]:
    """`with bar("layers", 30) as advance: ... advance()`."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)
