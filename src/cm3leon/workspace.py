"""Output directories: replace only what cm3leon wrote, and let one run use a directory at a time.

Replacing. A writer that replaces a directory (a dataset, tokenized shards, a quickstart
stage folder) passes :func:`check_replaceable` / :func:`replace_owned_dir` an *owner*: a
function that reads the directory's own marker (a dataset's ``manifest.json``, the shard
files, a stage's ``stage.json``) and returns the files that marker says its writer wrote,
or None when there is no such marker. Any other file under the directory is foreign, and
a directory holding one is refused (:class:`NotOwnedError`) instead of deleted.
:func:`check_not_inside` refuses an output that is, or lies inside, one of the inputs.

Locking. :class:`WorkspaceLock` is an advisory ``fcntl.flock`` on a lock file in the
directory (or beside it, for a directory that is swapped in whole). The file records the
holder's pid, command line and start time, so a second run names who holds it
(:class:`WorkspaceBusyError`). The kernel drops the lock when its process dies, so a lock
file left by a dead process is simply taken over. The lock is per open file, so a second
:class:`WorkspaceLock` on the same directory in the same process is refused too.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Container, Sequence
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

LOCK_NAME = ".cm3leon.lock"  # the lock file inside a locked directory
SIBLING_LOCK_SUFFIX = ".cm3leon.lock"  # ".<name>.cm3leon.lock" beside a directory that is swapped in whole
EXAMPLES = 3  # foreign files named in a refusal

# An owner: directory -> the relative (posix) paths its writer wrote there, None if no marker of it.
Owner = Callable[[Path], "Container[str] | None"]


class WorkspaceError(Exception):
    """An output directory that cannot be used as asked; the CLI reports it as one line."""


class NotOwnedError(WorkspaceError, FileExistsError):
    """The directory to replace holds files that its writer did not write."""


class OutputInsideInputError(WorkspaceError, ValueError):
    """The output directory is an input, lies inside one, or holds one."""


class WorkspaceBusyError(WorkspaceError, BlockingIOError):
    """Another process holds the directory's lock."""


# ---- replacing -------------------------------------------------------------------------------
def is_lock_file(rel: str) -> bool:
    """True if relative path ``rel`` names a lock file of :class:`WorkspaceLock`."""
    name = rel.rsplit("/", 1)[-1]
    return name == LOCK_NAME or (name.startswith(".") and name.endswith(SIBLING_LOCK_SUFFIX))


def list_files(path: str | os.PathLike[str]) -> list[str]:
    """Every file under directory ``path`` (symlinks included, not followed) as a relative
    posix path; directories themselves are not listed."""
    root = Path(path)
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in [*filenames, *(d for d in dirnames if (base / d).is_symlink())]:
            out.append((base / name).relative_to(root).as_posix())
    return sorted(out)


def foreign_files(path: str | os.PathLike[str], owner: Owner) -> list[str]:
    """The files under directory ``path`` that ``owner``'s writer did not write (all of them
    when the directory has no marker of it), shallowest first. Stale lock files of this
    module count as written."""
    p = Path(path)
    owned = owner(p)
    files = [f for f in list_files(p) if not is_lock_file(f)]
    foreign = files if owned is None else [f for f in files if f not in owned]
    return sorted(foreign, key=lambda f: (f.count("/"), f))


def not_owned_message(path: str | os.PathLike[str], foreign: Sequence[str]) -> str:
    """The one-line refusal for a directory holding ``foreign`` files."""
    n = len(foreign)
    shown = ", ".join(foreign[:EXAMPLES]) + (", ..." if n > EXAMPLES else "")
    return (f"{path} holds {n} file{'s' if n != 1 else ''} that cm3leon did not write (e.g. {shown}); "
            "choose an empty --out or remove them yourself")


def check_replaceable(path: str | os.PathLike[str], owner: Owner) -> None:
    """Raise :class:`NotOwnedError` unless ``path`` is absent, an empty directory, or a
    directory holding only files that ``owner``'s writer wrote."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return
    if p.is_symlink() or not p.is_dir():
        raise NotOwnedError(f"{path} is a file, not a directory cm3leon wrote; choose another --out or remove it "
                            "yourself")
    foreign = foreign_files(p, owner)
    if foreign:
        raise NotOwnedError(not_owned_message(path, foreign))


def replace_owned_dir(path: str | os.PathLike[str], owner: Owner) -> None:
    """Remove directory ``path`` if it holds only what ``owner``'s writer wrote (see
    :func:`check_replaceable`); else raise :class:`NotOwnedError` and remove nothing."""
    check_replaceable(path, owner)
    if Path(path).exists():
        shutil.rmtree(path)


def check_not_inside(out: str | os.PathLike[str], *inputs: str | os.PathLike[str] | None, flag: str = "--out",
                     replaces: bool = True) -> None:
    """Raise :class:`OutputInsideInputError` if ``out`` is one of ``inputs`` or lies inside
    one; with ``replaces`` (``out`` is removed and written anew) also if an input lies inside
    ``out``. ``flag`` names the output in the message. None inputs are skipped."""
    o = Path(out).resolve()
    for inp in inputs:
        if inp is not None:
            i = Path(inp).resolve()
            if o == i or i in o.parents:
                raise OutputInsideInputError(f"{flag} {out} is inside the input {inp}: write elsewhere")
    if replaces:
        check_not_replaced(out, *inputs, flag=flag)


def check_not_replaced(out: str | os.PathLike[str], *inputs: str | os.PathLike[str] | None,
                       flag: str = "--out") -> None:
    """Raise :class:`OutputInsideInputError` if replacing ``out`` would remove one of ``inputs``
    (it is ``out`` or lies inside it); an output inside an input passes. None inputs are skipped."""
    o = Path(out).resolve()
    for inp in inputs:
        if inp is None:
            continue
        i = Path(inp).resolve()
        if o == i:
            raise OutputInsideInputError(f"{flag} {out} is the input {inp}: write elsewhere")
        if o in i.parents:
            raise OutputInsideInputError(f"the input {inp} is inside {flag} {out}, which would be replaced: "
                                         "write elsewhere")


# ---- locking ---------------------------------------------------------------------------------
def command_line(argv: Sequence[str] | None = None) -> str:
    """The running command as a user typed it (``cm3leon ...`` for the CLI)."""
    argv = list(sys.argv if argv is None else argv) or ["python"]
    prog = Path(argv[0]).name
    if prog in ("cm3leon", "cli.py", "__main__.py"):
        prog = "cm3leon"
    return shlex.join([prog, *argv[1:]])


def _since(t: float) -> str:
    fmt = "%H:%M" if time.strftime("%Y-%m-%d", time.localtime(t)) == time.strftime("%Y-%m-%d") else "%Y-%m-%d %H:%M"
    return time.strftime(fmt, time.localtime(t))


def _read_holder(f: IO[str]) -> dict[str, Any] | None:
    try:
        f.seek(0)
        rec = json.loads(f.read() or "null")
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


class WorkspaceLock:
    """An advisory lock on ``directory``: ``with WorkspaceLock(d): ...`` or
    :meth:`acquire` / :meth:`release`.

    The lock file is ``directory/.cm3leon.lock``, or with ``sibling=True``
    ``<parent>/.<name>.cm3leon.lock`` (for a directory that is renamed into place, which would
    carry a lock file inside it away). :meth:`acquire` never waits: a held lock raises
    :class:`WorkspaceBusyError` naming the holder. ``command`` is what the lock file records
    (default: this process's command line). :meth:`release` removes the lock file, and the
    directories :meth:`acquire` created if they are still empty.
    """

    def __init__(self, directory: str | os.PathLike[str], *, sibling: bool = False,
                 command: str | None = None) -> None:
        self.directory = Path(directory)
        d = self.directory
        self.path = d.parent / f".{d.name}{SIBLING_LOCK_SUFFIX}" if sibling else d / LOCK_NAME
        self.command = command
        self._file: IO[str] | None = None
        self._pid = 0
        self._made: list[Path] = []  # directories acquire() created, deepest first

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._file is not None

    def acquire(self) -> WorkspaceLock:
        """Take the lock (creating the directory if needed) or raise :class:`WorkspaceBusyError`."""
        if self._file is not None:
            raise RuntimeError(f"{self.path} is already held by this WorkspaceLock")
        while True:
            made = [d for d in (self.path.parent, *self.path.parent.parents) if not d.exists()]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._made = self._made or made
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # another releasing holder removed the empty directory: again
                continue
            f = os.fdopen(fd, "r+", encoding="utf-8")
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy = _read_holder(f)
                f.close()
                self._made = []
                raise WorkspaceBusyError(self._busy_message(busy)) from None
            # A holder removes the file on release: if the path no longer names the file we
            # locked, someone else may lock the new one, so start again.
            try:
                st, now = os.fstat(f.fileno()), os.stat(self.path)
                if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                    break
            except FileNotFoundError:
                pass
            f.close()
        stale = _read_holder(f)
        if stale and stale.get("pid") != os.getpid():
            log.warning("%s: taking over the lock of pid %s (%s), which is no longer running", self.directory,
                        stale.get("pid"), stale.get("command"))
        rec = {"pid": os.getpid(), "command": self.command or command_line(), "started": time.time(),
               "host": os.uname().nodename}
        f.seek(0)
        f.truncate()
        f.write(json.dumps(rec) + "\n")
        f.flush()
        self._file, self._pid = f, os.getpid()
        return self

    def _busy_message(self, holder: dict[str, Any] | None) -> str:
        if not holder or "pid" not in holder:
            return f"{self.directory} is in use by another process (lock file {self.path}); wait for it or stop it"
        since = f", since {_since(float(holder['started']))}" if isinstance(holder.get("started"), (int, float)) else ""
        where = f" on {holder['host']}" if holder.get("host") not in (None, os.uname().nodename) else ""
        return (f"{self.directory} is in use by pid {holder['pid']}{where} ({holder.get('command', '?')}{since}); "
                "wait for it or stop it")

    def release(self) -> None:
        """Drop the lock and remove its file (a no-op when not held)."""
        f, self._file = self._file, None
        if f is None:
            return
        made, self._made = self._made, []
        if os.getpid() == self._pid:  # a forked child's copy must not remove its parent's lock file
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            for d in made:
                try:
                    d.rmdir()
                except OSError:  # not empty (or gone): keep it and its parents
                    break
        f.close()

    def __enter__(self) -> WorkspaceLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:  # a lock object dropped without release: free the lock with its file
        try:
            self.release()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"WorkspaceLock({str(self.directory)!r}, held={self.held})"


def holder(directory: str | os.PathLike[str], *, sibling: bool = False) -> dict[str, Any] | None:
    """What the lock file of ``directory`` records (pid, command, started, host), or None when
    there is none; the record of a dead process is returned too (see ``alive``)."""
    lk = WorkspaceLock(directory, sibling=sibling)
    try:
        with open(lk.path, encoding="utf-8") as f:
            rec = _read_holder(f)
    except FileNotFoundError:
        return None
    if rec is not None:
        rec["alive"] = _pid_alive(rec.get("pid"))
    return rec
