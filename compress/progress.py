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


def key_values(summary: dict, prefix: str = "") -> str:
    """A pass summary as `key=value` pairs for people (JSON is what --json prints): nested
    mappings flatten to dotted keys, floats keep 4 significant digits, long lists show their
    length."""
    parts = []
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            parts.append(key_values(value, name + ".") if value else f"{name}=none")
        elif isinstance(value, float):
            parts.append(f"{name}={value:.4g}")
        elif isinstance(value, (list, tuple)):
            shown = ",".join(map(str, value)) if len(value) <= 4 else f"[{len(value)} items]"
            parts.append(f"{name}={shown or 'none'}")
        else:
            parts.append(f"{name}={value}")
    return " ".join(p for p in parts if p)
