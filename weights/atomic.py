"""Write a file or a folder so that it appears complete or not at all.

`atomic_write` (one file) and `atomic_folder` (a whole folder) fill a temporary sibling of the
destination and `os.replace` it onto the destination on success; on failure the temporary vanishes and
the old destination, if any, is left as it was. Parent folders are created.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_folder(dst: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `dst` to fill; on success it replaces `dst`, on failure it vanishes.

    An existing `dst` is an error unless `force`, and even then it is only removed once the new folder is
    complete, so an interrupted run never leaves a half-written destination.
    """
    dst = Path(dst)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} already exists; choose another output or pass --force to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kw: Any) -> Iterator[Any]:
    """Open a temporary sibling of `path` for writing; on success it replaces `path`, on failure it vanishes."""
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_write needs a write mode ('w', 'wb', ...), got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kw) as f:
            # mkstemp makes the file private (0600); give it the replaced file's mode, or a plain file's
            os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
