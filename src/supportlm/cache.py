"""The supportlm cache: converted models and exported adapters, keyed by content, atomic.

Everything here is written once and read many times (``$SUPPORTLM_CACHE``, default
``~/.cache/supportlm``). A key names what an entry was made from (a file's path, size and mtime;
an adapter's content hash), so a replaced base file or a retrained adapter gets a new entry; an
entry appears whole or not at all (`atomic_target`), so a crash mid-write never leaves half a
file that a later start would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where converted models and exported adapters are kept."""
    return Path(os.environ.get("SUPPORTLM_CACHE", "~/.cache/supportlm")).expanduser()


def file_stamp(path: Path) -> str:
    """A file's identity without reading it: resolved path, size and modification time."""
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"


def file_digest(*paths: Path) -> str:
    """SHA-256 of the files' contents, in order."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def short_hash(*parts: object, length: int = 16) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:length]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_target(target: Path) -> Iterator[Path]:
    """Yield a sibling path to write a file or folder to; on success it becomes `target`.

    A file replaces `target` in one `os.replace`; a folder replaces an existing folder by removing
    it first (POSIX cannot rename over a non-empty folder), so readers see the old or the new
    folder, or briefly none, never a half-written one. On error the partial copy is removed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    _remove(partial)
    try:
        yield partial
    except BaseException:
        with contextlib.suppress(OSError):
            _remove(partial)
        raise
    if partial.is_dir() and target.exists():
        _remove(target)
    os.replace(partial, target)


def cached(folder: str, stem: str, key: str, write: Callable[[Path], object], suffix: str) -> Path:
    """``<cache>/<folder>/<stem>-<key><suffix>``, written once by `write`; older keys are deleted.

    A retrained adapter gets a new key, and its stale exports (145 MB for a merged SmolLM2) would
    otherwise pile up in the cache with every training run.
    """
    target = cache_dir() / folder / f"{stem}-{key}{suffix}"
    if target.exists():
        return target
    logger.info("Writing %s (once).", target)
    with atomic_target(target) as partial:
        write(partial)
    for stale in target.parent.glob(f"{stem}-*{suffix}"):
        # Same stem and a key of the same length: not a longer stem that starts with this one.
        if stale != target and len(stale.name) == len(target.name):
            with contextlib.suppress(OSError):  # in use on Windows: left for next time
                _remove(stale)
    return target
