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
