"""Write a file or a folder so that it appears complete or not at all, and refuse unwritable outputs up front.

`atomic_write` (one file) and `atomic_folder` (a whole folder) fill a temporary sibling of the
destination and `os.replace` it onto the destination on success; on failure (an exception or Ctrl-C) the
temporary vanishes and the old destination, if any, is left as it was. Parent folders are created.
`rename_noreplace` moves a finished folder into place only if nothing appeared there meanwhile (another
process writing the same output). `check_output_path` finds, before any work starts, the output paths that
could not be written at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not Linux/glibc >= 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename `src` to `dst`, raising FileExistsError when `dst` exists, without replacing it.

    On Linux this is one atomic `renameat2(RENAME_NOREPLACE)`; elsewhere (or on a file system without
    it) the check and the rename are two steps, so callers writing a shared destination also take a lock.
    """
    src_b, dst_b = os.fsencode(src), os.fsencode(dst)
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, src_b, _AT_FDCWD, dst_b, _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "exists already", os.fsdecode(dst))
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), os.fsdecode(src))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "exists already", os.fsdecode(dst))
    os.rename(src, dst)


def check_output_path(path: str | os.PathLike, *, flag: str, folder: bool = False, suffix: str | None = None) -> None:
    """Raise ValueError, naming `flag`, if `path` cannot be written as an output file (or `folder`).

    Checked: the suffix (when given), a file path that is an existing folder or a folder path that is an
    existing file, a parent below a regular file, and a first existing ancestor that is not writable.
    """
    path = Path(path)
    if not folder and path.is_dir():
        example = path / ("video" + (suffix or ""))
        raise ValueError(f"{flag} {path} is a folder; give a file path inside it, e.g. {example}")
    if suffix is not None and path.suffix.lower() != suffix:
        raise ValueError(f"{flag} {path}: the name must end in {suffix}")
    if folder and (path.exists() or path.is_symlink()) and not path.is_dir():
        raise ValueError(f"{flag} {path} exists and is not a folder; choose another path")
    anc = (path if folder else path.parent).absolute()
    while not (anc.exists() or anc.is_symlink()) and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ValueError(f"{flag} {path}: {anc} is a file, so no folder can be made below it")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: no permission to create files in {anc}")


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
        if force and dst.exists():
            shutil.rmtree(dst)
        rename_noreplace(tmp, dst)
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
