"""The one exception type users see: a message that names what is wrong and how to fix it."""


class CompressError(Exception):
    """An error caused by the user's input or environment; the CLI prints it as one line.

    exit_code 2 marks usage errors (bad recipe, bad arguments), 1 everything else.
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(CompressError):
    def __init__(self, message: str):
        super().__init__(message, exit_code=2)


class BadInputData(CompressError):
    """The input's own values are unusable (NaN weights, ...): running the same command again
    fails the same way, so an interrupted run of it is worth nothing."""


class DiskFull(CompressError):
    """Writing failed for lack of space (the pipeline adds how much is needed)."""


def disk_full(exc: BaseException) -> bool:
    """ENOSPC, raised by Python (OSError 28) or by safetensors (a SafetensorError that quotes
    the OS error)."""
    if isinstance(exc, OSError):
        return exc.errno == 28
    text = str(exc)
    return type(exc).__name__ == "SafetensorError" and ("code: 28" in text
                                                        or "No space left" in text)
