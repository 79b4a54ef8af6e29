"""The structured error of loldu-sd: what path went wrong and why, as two fields rather than one message to parse."""
from __future__ import annotations

import os


class PathError(ValueError):
    """A problem with one file or folder: `path` names it, `reason` says what is wrong; str() is "path: reason"."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason

    def __reduce__(self):  # pickles (multiprocessing) with both fields, not the joined message
        return type(self), (self.path, self.reason)
