"""Files the toolkit owns, written safely: atomic writes with the permissions open() would give,
checksums, names that stay inside their folder, a full disk said in one line, and the lock that keeps
a second process out of a folder. No torch here: the data tools import this without it."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gptkit.errors import RunFailure, UserError

# ----------------------------------------------------------------------------------------------
# Permissions


@functools.lru_cache(maxsize=1)
def process_umask() -> int:
    """The process umask, read from /proc where it can be (os.umask can only be read by setting it,
    which races with other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in open("/proc/self/status"):
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    """What open() gives a new file: 0o666 less the umask."""
    return 0o666 & ~process_umask()


def dir_mode() -> int:
    """What mkdir() gives a new folder: 0o777 less the umask."""
    return 0o777 & ~process_umask()


# ----------------------------------------------------------------------------------------------
# Writing

DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def os_reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _mib(n: float) -> str:
    if n < 2**20:
        return f"{max(1, round(n / 2**10)):,} KiB"
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def full_disk_cause(e: BaseException | None) -> OSError | None:
    """The full-disk (or file-size limit) OSError behind an error: itself, one in its chain (torch.save
    ends a failed write with a RuntimeError of its own), or one a library reports in words
    ("... (os error 28)", as safetensors does)."""
    import re

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return e
        m = re.search(r"\(os error (\d+)\)", str(e))
        if m and int(m.group(1)) in DISK_FULL:
            return OSError(int(m.group(1)), os.strerror(int(m.group(1))))
        e = e.__cause__ or e.__context__
    return None


def disk_full(path, e: OSError, needed: int | None = None) -> RunFailure:
    """One line for a write that ran out of room: the path, what it needed and what is free."""
    path = Path(path)
    folder = next((p for p in (path.parent, *path.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(folder).free
    limit = " or the file-size limit (ulimit -f) was reached" if e.errno == errno.EFBIG else ""
    need = f"it needs about {_mib(needed)}, " if needed else ""
    return RunFailure(f"could not write {path}: {os_reason(e)}{limit}; {need}{_mib(free)} is free there. Free some "
                      "space (or write elsewhere) and run the same command again: nothing half-written was kept")


def atomic_write(path, write: Callable, size_hint: int | None = None) -> Path:
    """Write a file atomically: `write(f)` fills a temp file in the same directory, which is fsynced
    and renamed over `path` (then the directory is fsynced). A crash at any point leaves either the old
    file or the complete new one, never a torn one. The file gets the permissions open() would give it.
    A full disk or file-size limit is one RunFailure naming the path and the space needed (`size_hint`,
    or at least what was written when it failed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())  # mkstemp makes 0600: a shared cache or export needs more
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        written = os.stat(tmp).st_size if os.path.exists(tmp) else 0
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        full = full_disk_cause(e)
        if full is not None:
            raise disk_full(path, full, size_hint or written) from None
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        dfd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def write_json(path, obj) -> Path:
    return atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def remove_stale_temps(folder: Path, names: Callable[[str], bool]) -> list[Path]:
    """Delete temp files left in `folder` by a killed writer (".NAME.<random>.tmp" as atomic_write
    makes them, or ".NAME.tmp"), for final names that `names` accepts: the caller's own files only."""
    removed = []
    for p in folder.iterdir() if folder.is_dir() else ():
        if not (p.name.startswith(".") and p.name.endswith(".tmp")) or not p.is_file():
            continue
        inner = p.name[1:-4]
        if names(inner) or names(inner.rsplit(".", 1)[0]):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def is_plain_name(name: str) -> bool:
    """A file name that stays in its folder: no separators, not '.', '..' or empty, no NUL."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def walk_files(folder: Path, accept: Callable[[str], bool], skip: Path | None = None) -> tuple[list[str], list[str]]:
    """Files under `folder` that `accept(path)` takes (hidden files and folders are not looked at), sorted,
    and notes on links: a symlinked file is read where it points (a note names those pointing outside
    the folder), a symlinked folder is not entered (a loop could never end). `skip` is a folder left out."""
    skip = os.path.realpath(skip) if skip else None
    files, linked_dirs = [], []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        linked_dirs += [os.path.join(dirpath, d) for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        dirnames[:] = _entered(dirpath, dirnames, skip)
        files += [p for p in (os.path.join(dirpath, n) for n in filenames if not n.startswith("."))
                  if os.path.isfile(p) and accept(p)]
    return sorted(files), _link_notes(folder, files, linked_dirs)


def _entered(dirpath: str, dirnames: list[str], skip: str | None) -> list[str]:
    """The subfolders the walk goes into: not hidden, not `skip` (os.walk itself never enters links)."""
    return sorted(d for d in dirnames if not d.startswith(".") and os.path.realpath(os.path.join(dirpath, d)) != skip)


def _link_notes(folder: Path, files: list[str], linked_dirs: list[str]) -> list[str]:
    """What the walk says about links: files read from outside `folder`, folders not entered."""
    root = os.path.realpath(folder)
    outside = [f"{p} -> {os.path.realpath(p)}" for p in files
               if os.path.islink(p) and os.path.commonpath([root, os.path.realpath(p)]) != root]
    notes = []
    if outside:
        notes.append(f"note: {len(outside)} file(s) in {folder} are symlinks to files outside it, read as data "
                     f"(first: {outside[0]})")
    if linked_dirs:
        notes.append(f"note: {len(linked_dirs)} symlinked folder(s) in {folder} were not entered (first: "
                     f"{linked_dirs[0]}); pass their targets as data of their own to read them")
    return notes


# A Hugging Face hub id: NAME or OWNER/NAME, letters, digits, '-', '_', '.', at most 96 each, no '--' or '..'.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def could_be_hub_id(source: str) -> bool:
    """Whether a string that names nothing on disk can be a hub id: not when it looks like a path (it
    starts with '.', '/' or '~', has a backslash, a trailing '/', more than one '/'), nor when it breaks
    the hub's naming rules."""
    if source.startswith((".", "/", "~")) or source.endswith("/") or "\\" in source:
        return False
    return bool(_HUB_ID.match(source)) and "--" not in source and ".." not in source and not source.endswith(".")


def no_such_path(what: str, source: str, hint: str = "") -> UserError:
    """The one line for a path that names nothing: which flag or argument, which path, the nearest
    folder that does exist."""
    near = nearest_existing(Path(source).expanduser())
    return UserError(f"{what} {source}: no such file or folder (the nearest existing folder is {near})"
                     + (f"; {hint}" if hint else ""))


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Output folders: made, or refused in one line before any work. `name` is how the user gave the
# folder (a flag, a variable), `hint` what to do instead.


def nearest_existing(path: Path) -> Path:
    """`path` or its nearest parent that exists (the folder a new one would be made in)."""
    return next((p for p in (path, *path.parents) if p.exists()), Path("."))


def make_folder(path: Path, name: str, hint: str) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"{name} {path} is a file; {hint}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {name} {path} ({os_reason(e)}); {hint}")


def check_writable_folder(path: Path, name: str, hint: str) -> None:
    """A folder this user can write, or one that can be made: checked without making it."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{name} {path} is a file; {hint}")
    existing = nearest_existing(path)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{name} {path} cannot be written ({existing} is read-only for this user); {hint}")


# ----------------------------------------------------------------------------------------------
# The lock


class FolderLock:
    """An exclusive claim on a folder: a lock file holding the holder's pid, host and start time,
    locked with flock while the holder lives (the kernel drops it when the process dies, so a lock
    left by a killed run on this host is stale at once). A lock file from another host is stale when
    its heartbeat (the file's mtime, touched every 30 s by a thread) is older than `stale_after`."""

    HEARTBEAT_S = 30.0

    def __init__(self, path: Path, what: str = "folder", stale_after: float = 300.0):
        self.path, self.what, self.stale_after = Path(path), what, stale_after
        self.fd: int | None = None
        self._stop = threading.Event()

    def acquire(self) -> FolderLock:
        for _ in range(3):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(self._held_message())
            if self._same_file(fd) and self._not_held_elsewhere(fd):
                self._claim(fd)
                return self
            os.close(fd)  # the file was replaced or removed while we opened it: try again
        raise UserError(self._held_message())

    def _same_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _not_held_elsewhere(self, fd: int) -> bool:
        """flock cannot see a holder on another host (network filesystems): trust its heartbeat."""
        info = self._read_info(fd)
        if not info or info.get("host") == socket.gethostname():
            return True
        age = time.time() - os.fstat(fd).st_mtime
        if age < self.stale_after:
            os.close(fd)
            raise UserError(self._held_message(info) + f" (it was alive {age:.0f}s ago; a lock older than "
                            f"{self.stale_after:.0f}s without a heartbeat counts as stale)")
        return True

    @staticmethod
    def _read_info(fd: int) -> dict | None:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            return json.loads(os.read(fd, 4096).decode() or "null")
        except (OSError, ValueError):
            return None

    def _claim(self, fd: int) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self.fd = fd
        threading.Thread(target=self._heartbeat, name="lock-heartbeat", daemon=True).start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def _held_message(self, info: dict | None = None) -> str:
        if info is None:
            with contextlib.suppress(OSError):
                fd = os.open(self.path, os.O_RDONLY)
                info = self._read_info(fd)
                os.close(fd)
        who = (f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')}" if isinstance(info, dict)
               else "another process")
        return (f"{self.path.parent} is in use by {who} ({self.path} is locked); wait for that {self.what} to end, "
                f"or use another folder")

    def clear_if_stale(self) -> None:
        """Remove a lock file whose holder is gone (left by a killed process); a live holder keeps it."""
        if self.path.exists():
            with contextlib.suppress(UserError):
                self.acquire().release()

    def release(self) -> None:
        if self.fd is None:
            return
        self._stop.set()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
