"""Files the harness writes: one atomic writer, and one owner per directory (an exclusive lock).

:func:`atomic_write_text` is the only way a whole file is written (config, results, samples, reports,
baselines): a temporary file in the same folder, flushed to disk, then renamed into place, so a crash or a
full disk leaves the old file or none, never half of one.

:class:`DirectoryLock` gives a directory one owner for the whole of a command (``run``, ``eval``, ``sft``,
``report``): a second command on it is refused, naming the holder. It is an ``flock`` on a file inside the
directory, so the kernel releases it when the holder dies, however it dies: a lock file left by a killed
process is taken over (and said so), never waited on or trusted.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .errors import HarnessError

#: the lock file inside a locked directory (a dot file: the history page and run listings skip it)
LOCK_FILE = ".detox-harness.lock"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then ``os.replace`` it into place.

    The temporary file is opened like any file (the umask's permissions, not the 0600 of a secure temporary
    file), and its name carries the process id so that two writers never share one. A failure leaves the old file
    as it was.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _describe(holder: dict) -> str:
    who = f"pid {holder.get('pid', '?')}"
    if holder.get("host") and holder.get("host") != socket.gethostname():
        who += f" on {holder['host']}"
    what = holder.get("command")
    since = holder.get("since")
    return who + (f" ({what}" + (f", since {since}" if since else "") + ")" if what else "")


def holder(directory: str | Path) -> str | None:
    """Who holds ``directory``'s lock now (as a refusal names them), or None; creates nothing."""
    import fcntl

    path = Path(directory) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            record = json.loads(os.read(fd, 4096) or b"{}")
        except ValueError:
            return "another process"
        if record.get("pid") == os.getpid() and record.get("host") == socket.gethostname():
            return None  # this process holds it (a check made again under its own lock)
        return _describe(record)
    finally:
        os.close(fd)  # closing drops a shared lock we took
    return None


class DirectoryLock:
    """An exclusive, non-blocking lock on ``directory`` (which must exist) for ``command``.

    ``acquire()`` raises a :class:`HarnessError` naming ``field`` and the holder when another live process
    holds it; a lock file whose holder is gone is taken over, and ``taken_over`` then describes that holder.
    ``release()`` removes the lock file (the directory is left as the command found it, plus its own output).
    """

    def __init__(self, directory: str | Path, command: str, *, field: str = "--output"):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.command = command
        self.field = field
        self.taken_over: str | None = None
        self._fd: int | None = None

    def _holder(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> DirectoryLock:
        import fcntl

        for _ in range(10):  # a holder that releases (unlinks) between our open and our flock: open again
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise HarnessError(f"another command is using this directory: {_describe(self._holder())}",
                                   field=self.field, value=str(self.directory),
                                   fix="wait for it to finish, or choose another directory") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the file we locked was released and removed meanwhile
                os.close(fd)
                continue
            previous = os.read(fd, 4096)
            if previous.strip():  # a lock file nobody holds: its writer died without releasing it
                try:
                    self.taken_over = _describe(json.loads(previous))
                except ValueError:
                    self.taken_over = "an unreadable lock file"
            record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                      "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            except OSError:  # a full disk: leave no empty lock file behind
                self.path.unlink(missing_ok=True)
                os.close(fd)
                raise
            self._fd = fd
            return self
        raise HarnessError("the directory's lock keeps changing hands", field=self.field, value=str(self.directory),
                           fix="wait for the other commands on it to finish")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: a waiter that opened it re-opens a fresh one
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
