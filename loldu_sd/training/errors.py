"""The two ways a training run fails, and the one-line form of any exception."""


class TrainingInputError(ValueError):
    """A flag, folder or image is unusable; raised before any model is loaded."""


class TrainingError(RuntimeError):
    """Training stopped (e.g. a NaN loss); the last checkpoint on disk is intact."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), for one-line errors."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
