"""Write a folder so that it appears complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


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
