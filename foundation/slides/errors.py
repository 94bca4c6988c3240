"""The one error type of the slide layer."""

from __future__ import annotations

import os


class SlideError(Exception):
    """A slide cannot be opened or read; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason
