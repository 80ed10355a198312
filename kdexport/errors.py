"""User-facing errors: one line that says what to do. The CLI prints them without a traceback (exit 2)."""


class KdexportError(Exception):
    """A mistake in the user's input or environment, not a bug."""


class ConfigError(KdexportError, ValueError):
    """An option or config value outside its valid range."""


class CheckpointError(KdexportError):
    """A checkpoint that is missing, corrupt, foreign, or of the wrong kind."""


class DataError(KdexportError):
    """A dataset that is missing or not in the expected layout."""


class TrainingError(KdexportError):
    """A run that cannot go on (for example a non-finite loss)."""


class CheckFailed(KdexportError):
    """A run finished but its check did not pass (exit 1)."""


class UnreadableImage(DataError):
    """An image file that cannot be decoded.

    A DataLoader worker's exception reaches the main process rebuilt from its whole traceback text; the message
    is cut back to the original line, so the user still reads one line naming the file.
    """

    def __init__(self, message: str):
        last = message.strip().splitlines()[-1] if message.strip() else message
        super().__init__(last.split("UnreadableImage: ", 1)[-1])
