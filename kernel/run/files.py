"""Reading inputs and writing outputs safely: an input is read only when it is a regular file
below a size cap (never a FIFO, a device or /dev/zero), and an output is written to a
temporary name in its directory and renamed over the target, so a crash leaves the old file or
the new one, and a symlink planted at the target is replaced, never written through."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["InputError", "open_atomic", "read_regular", "write_atomic"]


class InputError(OSError):
    """An input file is missing, not a regular file, too large or unreadable; says which."""


def read_regular(path: str | Path, cap: int, what: str) -> bytes:
    """The bytes of `path` when it is a regular file of at most `cap` bytes; InputError
    naming `what` (e.g. "config file") otherwise. Opened without blocking, so a FIFO is
    refused rather than waited on."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputError(f"{what} {str(p)!r} does not exist") from None
    except OSError as exc:
        raise InputError(f"{what} {str(p)!r} cannot be read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"{what} {str(p)!r} is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{what} {str(p)!r} is not a regular file (a device, FIFO or "
                             f"socket); refusing to read it")
        if st.st_size > cap:
            raise InputError(f"{what} {str(p)!r} is {st.st_size} bytes; the limit is {cap}")
        chunks = []
        left = cap + 1  # the file may grow while we read: stop just past the cap
        with os.fdopen(os.dup(fd), "rb") as f:
            while left > 0:
                chunk = f.read(min(left, 1 << 24))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > cap:
            raise InputError(f"{what} {str(p)!r} grew past the limit of {cap} bytes while "
                             f"being read")
        return data
    except OSError as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{what} {str(p)!r} cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_atomic(path: str | Path, *, sync: bool = False) -> Iterator[BinaryIO]:
    """A binary file that becomes `path` when the block ends without an error: a new
    temporary file next to `path` (created exclusively, so never through a symlink) renamed
    over it. With `sync`, the file and the directory are fsynced (a checkpoint must survive a
    power cut). On an error the temporary file goes and `path` is untouched."""
    p = Path(path)
    fd, name = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            yield f
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        _fsync_dir(p.parent)


def write_atomic(path: str | Path, parts: Iterable[bytes | memoryview | str],
                 *, sync: bool = False) -> int:
    """Write `parts` (text as UTF-8) through `open_atomic`; returns the bytes written."""
    n = 0
    with open_atomic(path, sync=sync) as f:
        for part in parts:
            data = part.encode("utf-8") if isinstance(part, str) else part
            f.write(data)
            n += memoryview(data).nbytes
    return n


def _fsync_dir(d: Path) -> None:
    # Makes the rename durable; not every platform lets a directory be opened.
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
