"""Writing into a run directory without losing it: failed writes become one typed error that names the
path and the OS error, and files that a resumed run rewrites are replaced atomically.

A full disk or a read-only mount surfaces deep inside orbax, TensorStore or a background thread; the user
needs only which path could not be written and why (``WriteFailed``). Everything already on disk stays
as it was, so freeing space and rerunning the same command resumes.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

# TensorStore reports the OS error as a code inside its message, with the file it was writing.
_TS_OS_CODE = re.compile(r"os_error_code='?(\d+)")
_TS_PATH = re.compile(r'(?:Failed writing|Error writing file|Failed to open|local file):? "([^"]+)"')


class WriteFailed(OSError):
    """A file of the run could not be written; ``str()`` is one line: the path and the OS error."""

    def __init__(self, path: str | os.PathLike, code: int | None, reason: str, *, context: str = ""):
        super().__init__(code, reason, str(path))
        self.path, self.code, self.reason, self.context = str(path), code, reason, context

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.reason}" + (f" ({self.context})" if self.context else "")


def exception_chain(exc: BaseException):
    """``exc`` and the exceptions it was raised from or during, outermost first."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def os_error_of(exc: BaseException) -> tuple[int, str, str | None] | None:
    """(errno, strerror, path) of the OS error behind ``exc`` (an OSError, or a TensorStore error that
    names one in its message); None when the failure was not an OS error."""
    for e in exception_chain(exc):
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno, e.strerror or os.strerror(e.errno), e.filename and str(e.filename)
        text = str(e)
        code = _TS_OS_CODE.search(text)
        if code:
            paths = _TS_PATH.findall(text)
            n = int(code.group(1))
            return n, os.strerror(n), paths[-1] if paths else None
    return None


def write_failed(exc: BaseException, path: str | os.PathLike) -> WriteFailed | None:
    """``exc`` as a ``WriteFailed`` (naming the innermost path it reports, else ``path``), or None when it
    is not an OS error (a bug, which should keep its traceback)."""
    found = os_error_of(exc)
    if found is None:
        return None
    code, reason, where = found
    return WriteFailed(where or path, code, reason)


@contextlib.contextmanager
def writing(path: str | os.PathLike):
    """Turn an OS error raised inside the block into ``WriteFailed`` naming ``path``."""
    try:
        yield
    except WriteFailed:
        raise
    except OSError as e:
        raise write_failed(e, path) from e


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``path`` through a temporary file and a rename: a kill or a full disk leaves the old file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with writing(path):
        try:
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
