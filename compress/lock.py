"""One run per output: an exclusive lock file next to it, held for the whole run.

`.<name>.lock` beside the output holds the PID of the run that owns it. flock is released by
the kernel when its holder dies (SIGKILL included), so a lock left by a dead run is simply
taken over; a live holder makes a second run stop at once with that holder's PID.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compress.errors import CompressError


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return "another process"
    return f"process {pid}" if pid.isdigit() else "another process"


def acquire(out: Path) -> int:
    """Lock `out` for this process; returns the open lock file descriptor."""
    path = lock_path(out)
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CompressError(f"cannot create the lock file {path} ({exc.strerror}); choose a "
                                "writable output location") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CompressError(f"{out} is being written by {_holder(path)} (lock {path}); "
                                "wait for it to finish or stop it first") from None
        # The previous holder may have unlinked the file between our open and our flock:
        # then we hold a lock on a deleted file, and must lock the one at the path.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)


def release(out: Path, fd: int) -> None:
    """Remove the lock file (while still holding it, so no one locks a file about to vanish)."""
    try:
        lock_path(out).unlink(missing_ok=True)
    finally:
        os.close(fd)


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    fd = acquire(out)
    try:
        yield
    finally:
        release(out, fd)
