"""Which operating-system error a failure is, whatever library raised it.

Python raises ``OSError`` with an ``errno``; the libraries flora writes and reads files through
do not: safetensors raises ``SafetensorError`` ("I/O error: No space left on device (os error
28)"), torch a ``RuntimeError`` ("unable to open file <...>: Too many open files (24)"), and a
wrapper may carry the real error only as its ``__cause__`` or ``__context__``. Telling a full
disk from a bad payload decides whether acknowledged work is waited for or thrown away, so the
error is recognised by what it is: its own errno, else one named in its text.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator

from safetensors import SafetensorError

# "(os error 28)" (Rust's io::Error), "[Errno 28]" (Python's OSError as text).
_NUMBERED = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")
# Errors a library may report by their description alone ("Too many open files (24)").
_DESCRIBED = (errno.ENFILE, errno.EMFILE, errno.ENOSPC, errno.EDQUOT, errno.EIO)
# The libraries that report an OS error as text only. Nothing else's text is read: a payload
# refusal may quote what a client sent, and a client must not pass its bad update off as a full disk.
_TEXT_ONLY = (SafetensorError, RuntimeError)


def chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and every exception it was raised from or while handling, innermost last; ``raise ...
    from None`` ends the chain there (its author said the earlier error is not the cause)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def errno_in_text(text: str) -> int | None:
    """The errno a library's message names, by number or by its description, if any."""
    if match := _NUMBERED.search(text):
        return int(match.group(1) or match.group(2))
    lowered = text.lower()
    for code in _DESCRIBED:  # ENFILE before EMFILE: "Too many open files in system" holds both texts
        if os.strerror(code).lower() in lowered:
            return code
    return None


def os_errno(error: BaseException) -> int | None:
    """The operating-system error behind ``error`` (its own, a cause's, or one named in a message)."""
    for link in chain(error):
        if isinstance(link, OSError) and link.errno is not None:
            return link.errno
        if isinstance(link, _TEXT_ONLY) and (code := errno_in_text(str(link))) is not None:
            return code
    return None
