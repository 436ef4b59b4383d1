"""Write a file or a folder so that it appears complete or not at all, and refuse unwritable outputs up front.

`atomic_write` (one file) and `atomic_folder` (a whole folder) fill a temporary sibling of the
destination and move it onto the destination on success; on failure (an exception or Ctrl-C) the
temporary vanishes and the old destination, if any, is left as it was. Parent folders are created.
Folder writers of one destination exclude each other by a lock file next to it (a dead process's lock is
taken over), without `force` the final rename never replaces a destination that appeared meanwhile
(`rename_noreplace`), and with `force` the old destination is removed only after the new one is in
place. `check_output_path` finds, before any work starts, the output paths that could not be written.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import socket
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


TMP_TAG = ".wanport-tmp-"
OLD_TAG = ".wanport-old-"
LOCK_TAG = ".wanport-lock"
TEMP_TAGS = (TMP_TAG, OLD_TAG, LOCK_TAG)  # names of the temporaries next to a destination


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(dst: Path) -> None:
    """Remove temp folders a killed writer left next to `dst` (their owning process is gone)."""
    if not dst.parent.is_dir():
        return
    for p in dst.parent.glob(f".{dst.name}{TMP_TAG}*"):
        m = re.match(rf"\.{re.escape(dst.name)}{re.escape(TMP_TAG)}(\d+)-", p.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def lock_path(dst: Path) -> Path:
    return dst.parent / f".{dst.name}{LOCK_TAG}"


@contextlib.contextmanager
def output_lock(dst: Path, writer: str = "wanport convert", job: str = "conversion") -> Iterator[Path]:
    """Hold an exclusive lock on writing `dst`: a lock file next to it, created with O_CREAT|O_EXCL and
    removed at the end. A lock left by a dead process of this host is taken over."""
    lock = lock_path(dst)
    host = socket.gethostname()
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                pid_text, _, owner = lock.read_text(encoding="utf-8").strip().partition(" ")
                pid = int(pid_text)
            except (OSError, ValueError):
                pid, owner = -1, ""
            if attempt == 0 and owner == host and pid > 0 and not _pid_alive(pid):
                lock.unlink(missing_ok=True)  # its writer was killed
                continue
            raise FileExistsError(
                f"{dst} is being written by another {writer} (process {pid} on {owner or 'unknown host'}, "
                f"lock file {lock}); wait for it to finish, or delete the lock file if no {job} is running"
            ) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {host}\n")
        yield lock
    finally:
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(dst: str | os.PathLike, *, force: bool = False, writer: str = "wanport convert",
                  job: str = "conversion") -> Iterator[Path]:
    """Yield a temporary sibling folder of `dst` to fill; on success it is renamed to `dst`, on any failure
    (Ctrl-C included) it is removed. An existing `dst` stays untouched unless `force`, and then it is
    replaced only after the new folder is complete. Writers of the same `dst` exclude each other by a
    lock file, and without `force` the final rename never replaces a `dst` that appeared meanwhile.
    `writer` and `job` name this kind of run in the messages."""
    dst = Path(dst)
    if (dst.exists() or dst.is_symlink()) and not force:
        raise FileExistsError(f"{dst} already exists; pass --force (force=True) to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(dst, writer, job):
        if (dst.exists() or dst.is_symlink()) and not force:
            raise FileExistsError(f"{dst} already exists; pass --force (force=True) to replace it")
        clean_stale(dst)
        tmp = dst.parent / f".{dst.name}{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            yield tmp
            if force and (dst.exists() or dst.is_symlink()):
                old = dst.parent / f".{dst.name}{OLD_TAG}{os.getpid()}-{secrets.token_hex(4)}"
                os.replace(dst, old)
                try:
                    os.replace(tmp, dst)
                except BaseException:
                    os.replace(old, dst)  # put the old output back
                    raise
                if old.is_dir() and not old.is_symlink():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink()
            else:
                try:
                    rename_noreplace(tmp, dst)
                except FileExistsError:
                    raise FileExistsError(
                        f"{dst} appeared while this {job} ran (written by another process); it was kept and "
                        "this output discarded. Pass --force to replace it"
                    ) from None
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
