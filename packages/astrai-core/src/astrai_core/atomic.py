"""Atomic writes: a file or folder appears under its name complete, or not at all.

Content is written to a hidden sibling, `.NAME.tmp-PID-N`, fsynced, and renamed over the target
(a rename within one filesystem is atomic). A folder being replaced is first renamed aside to
`.NAME.old-PID-N` and deleted after the swap, so the target is never missing for longer than
two renames. A failed write deletes its temporary.

A process killed mid-write (kill -9, out of memory, power loss) cannot clean up; the pid in the
name tells a later writer that the owner is gone. `remove_stale_temps` deletes such leftovers and
every write calls it for its target first.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

TEMP_TAG = "tmp"
OLD_TAG = "old"

# `.NAME.tmp-OWNER` / `.NAME.old-OWNER`; OWNER is `PID-N` (older releases wrote `PID` alone, or a
# random tempfile suffix that records no owner).
_TEMP_NAME = re.compile(rf"^\.(?P<name>.+)\.(?:{TEMP_TAG}|{OLD_TAG})-(?P<owner>[^/]+)$")
_OWNER_PID = re.compile(r"^(?P<pid>\d+)(?:-\d+)?$")

_counter = itertools.count()
_active: set[Path] = set()  # temporaries this process is writing right now


def temp_path(target: str | os.PathLike[str], tag: str = TEMP_TAG) -> Path:
    """A fresh hidden sibling name of `target` that records this process's pid (absolute, so
    that it stays the same name if the working directory changes during the write)."""
    target = Path(target).absolute()
    return target.with_name(f".{target.name}.{tag}-{os.getpid()}-{next(_counter)}")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # 0 and negatives address process groups in os.kill, not one process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except (OverflowError, OSError):
        return False
    return True


def is_stale(path: Path) -> bool:
    """Whether `path` is an atomic-write leftover whose writer has ended."""
    match = _TEMP_NAME.match(path.name)
    if match is None:
        return False
    owner = _OWNER_PID.match(match["owner"])
    if owner is None:
        return True  # a random suffix (tempfile, older releases): no owner recorded, no one waits
    pid = int(owner["pid"])
    if pid == os.getpid():
        # Our pid, but not a write of ours: an earlier process that had the same pid (containers
        # start their command as the same pid every time) was killed mid-write.
        return path.absolute() not in _active
    return not _pid_alive(pid)


def remove_stale_temps(folder: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Delete the leftovers in `folder` of writes whose process is gone: the temporaries of the
    target `name`, or of every target when `name` is None. Returns what was deleted."""
    folder = Path(folder).absolute()
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        match = _TEMP_NAME.match(path.name)
        if match is None or (name is not None and match["name"] != name) or not is_stale(path):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError:  # best effort: a leftover we may not delete must not stop the write
            continue
        removed.append(path)
    return removed


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (the folder fsync makes a rename durable)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (PermissionError, IsADirectoryError):  # platforms that cannot open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if not path.is_symlink():
            fsync_path(path)
    fsync_path(folder)


class AtomicFile:
    """The temporary of one file write. `with atomic_file(p) as tmp:` writes `tmp` and renames it
    over `p` at the end of the block; a writer that outlives one block (a dataset writer) calls
    `commit()` or `discard()` itself."""

    def __init__(self, target: str | os.PathLike[str]) -> None:
        self.target = Path(target)
        if not self.target.parent.is_dir():
            raise FileNotFoundError(f"{self.target.parent}: folder does not exist; create it "
                                    f"before writing {self.target.name} there")
        remove_stale_temps(self.target.parent, self.target.name)
        self.path = temp_path(self.target)
        _active.add(self.path)

    def commit(self) -> Path:
        try:
            fsync_path(self.path)
            os.replace(self.path, self.target)
            fsync_path(self.target.parent)
        finally:
            self.discard()
        return self.target

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        _active.discard(self.path)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def atomic_file(target: str | os.PathLike[str]) -> AtomicFile:
    """Write a file atomically: `with atomic_file(path) as tmp: tmp.write_text(...)`."""
    return AtomicFile(target)


@contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Write a folder atomically: fill the yielded empty folder; at the end of the block it
    replaces `target` (an existing folder there is replaced as a whole)."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} is a file; pass a folder path (or delete the file)")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent, target.name)
    tmp = temp_path(target)
    _active.add(tmp)
    try:
        tmp.mkdir()
        yield tmp
        fsync_tree(tmp)
        _swap_in(tmp, target)
        fsync_path(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        _active.discard(tmp)


def _swap_in(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing folder is renamed aside first and then deleted
    (a rename cannot replace a non-empty folder)."""
    if not target.exists():
        os.replace(new, target)
        return
    old = temp_path(target, OLD_TAG)
    _active.add(old)
    try:
        os.replace(target, old)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(old, target)  # put the previous folder back
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        _active.discard(old)
