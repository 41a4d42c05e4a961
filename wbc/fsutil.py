"""Output files that are never half-written, never written by two processes, never a late surprise.

- `atomic_write(path)`: write beside the target, fsync, rename; a crash leaves the old file or none.
- `output_lock(out)`: an advisory lock per output (`OUT.lock` beside it, `fcntl.flock`, holding
  the owner's pid). A second writer is refused with a message naming that pid; the kernel drops the
  lock when its owner dies, so the lock of a killed process is simply taken over. Callers take it
  before `--overwrite` deletes anything, so an output a live process holds is never deleted.
- `check_writable(path)`: the checks a long computation should pass before it starts (a file
  where a folder is needed, a read-only destination, a name longer than the filesystem allows).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from wbc.errors import WbcError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; outputs are then unguarded, as before
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

NAME_MAX = 255  # bytes per path component on ext4, xfs, btrfs, APFS, NTFS


def _component_limit(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return NAME_MAX


def check_writable(path: str | Path, what: str = "output") -> Path:
    """Refuse (WbcError) an output path that cannot be created, before any work is done.

    Checks each new component's length, that every existing ancestor is a folder, and that the
    nearest existing folder accepts a new file (probed by creating and removing one, so read-only
    mounts and permissions are both caught, also for root). Creates nothing that stays.
    """
    path = Path(path)
    for name in path.parts:  # first: stat() of an over-long name fails with its own OSError
        if len(os.fsencode(name)) > NAME_MAX:
            raise WbcError(f"cannot write {what} {path}: the name {name[:40]}... is "
                           f"{len(os.fsencode(name))} bytes, over the {NAME_MAX} a filesystem allows")
    if path.exists() and not os.access(path, os.W_OK):
        raise WbcError(f"cannot write {what} {path}: it exists and is read-only")
    folder = path.parent if str(path.parent) else Path(".")
    missing: list[str] = [path.name]
    while not folder.exists() and folder != folder.parent:
        missing.append(folder.name)
        folder = folder.parent
    if not folder.is_dir():
        raise WbcError(f"cannot write {what} {path}: {folder} is a file, not a folder")
    limit = _component_limit(folder)  # some filesystems allow fewer
    for name in missing:
        if len(os.fsencode(name)) > limit:
            raise WbcError(f"cannot write {what} {path}: the name {name[:40]}... is "
                           f"{len(os.fsencode(name))} bytes, over this filesystem's {limit}")
    probe = folder / f".wbc-write-probe-{os.getpid()}-{threading.get_ident()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as e:
        raise WbcError(f"cannot write {what} {path}: {folder} does not accept new files "
                       f"({e.strerror or e})") from None
    os.close(fd)
    probe.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", newline: str | None = None,
                 encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success fsync and rename it onto `path`.

    On any exception the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    kw = {} if "b" in mode else {"newline": newline, "encoding": encoding}
    try:
        with open(tmp, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def lock_path(out: str | Path) -> Path:
    """`cache/x.zarr` -> `cache/x.zarr.lock` (beside the output, so `--overwrite` keeps it)."""
    out = Path(out)
    return out.with_name(out.name + ".lock")


# Locks this process holds: lock path -> [fd, depth]. A library call may lock an output its
# caller already locked (wbc robustness -> extract); flock would refuse our own second fd.
_HELD: dict[str, list[int]] = {}
_HELD_MUTEX = threading.Lock()


def _read_pid(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 64).decode(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"


def _acquire(lp: Path, out: Path) -> int:
    while True:
        fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            pid = _read_pid(fd)
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise WbcError(
                f"{out} is being written by another wbc process (pid {pid}, lock {lp.name}); "
                "wait for it to finish or stop it first (--overwrite does not override a running job)"
            ) from None
        # The previous holder may have removed the lock file between our open and flock: then we
        # locked an orphaned inode, and must retry on the file now at that path.
        try:
            same = os.fstat(fd).st_ino == os.stat(lp).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    old = _read_pid(fd)
    if old not in ("unknown", str(os.getpid())):
        log.info("taking over the lock of %s from pid %s, which is no longer running", out, old)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@contextlib.contextmanager
def output_lock(out: str | Path) -> Iterator[Path]:
    """Hold the advisory lock of output `out` for the duration of the block.

    Raises WbcError naming the holder's pid when another live process holds it. Re-entrant
    within one process. The lock file is removed on release.
    """
    out = Path(out)
    if fcntl is None:
        yield out
        return
    lp = lock_path(out)
    key = str(lp.resolve())
    with _HELD_MUTEX:
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
        else:
            lp.parent.mkdir(parents=True, exist_ok=True)
            _HELD[key] = [_acquire(lp, out), 1]
    try:
        yield out
    finally:
        with _HELD_MUTEX:
            held = _HELD[key]
            held[1] -= 1
            if held[1] == 0:
                del _HELD[key]
                # Unlink while still locked: a waiter that opened the old inode sees it is
                # orphaned (inode check in _acquire) and retries on a fresh file.
                with contextlib.suppress(OSError):
                    lp.unlink()
                os.close(held[0])


def holds_lock(out: str | Path) -> bool:
    """True when this process holds the lock of `out`."""
    return str(lock_path(out).resolve()) in _HELD
