"""One command at a time in a folder: ``FOLDER/.lock``, held with ``fcntl.flock`` while the command works there
(`train` in its run folder, `generate` and `evaluate` in their --out folder), and unique output names claimed with
``O_EXCL`` (two processes never pick the same free name).

The lock file records its holder (pid, host, command, start time) as JSON, for the refusal of a second command. The
kernel drops a flock when its process ends, however it ends: a lock file left by a killed process is stale (its
flock succeeds) and is taken over with a note. The holder deletes the file before it lets go of the flock; a process
that opened the file before then and gets the flock afterwards sees that the path now names another file (or none)
and opens it again.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from sd3tune.errors import Sd3tuneError

LOCK_NAME = ".lock"


def _holder_text(info: dict) -> str:
    """``pid 123 on host since 2026-01-01 10:00:00 (`sd3tune train runs/a`)`` from a lock file's JSON."""
    if not info:
        return "another process (it is starting: no details yet)"
    command = info.get("command")
    shown = f" (`{command}`)" if command else ""
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('since', '?')}{shown}"


def _read(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace") or "{}")
    except ValueError:  # being written this moment, or not ours
        return {}
    return data if isinstance(data, dict) else {}


def _open_locked(path: Path, what: str) -> tuple[int, dict]:
    """Open ``path`` and hold its flock; return the descriptor and the stale holder's JSON ({} when none)."""
    for _ in range(20):  # the holder deleted the file between our open and our flock: open it again
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise Sd3tuneError(f"cannot lock {path.parent} for {what}: {exc.strerror or exc}",
                               hint="choose a folder you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise Sd3tuneError(f"cannot lock {path}: {exc.strerror or exc}",
                                   hint="use a folder on a local disk") from None
            holder = {}
            for _ in range(10):  # the holder writes its JSON right after its flock
                holder = _read(fd)
                if holder:
                    break
                time.sleep(0.01)
            os.close(fd)
            where = f" on {holder['host']}" if holder.get("host", socket.gethostname()) != socket.gethostname() else ""
            raise Sd3tuneError(f"{path.parent} is in use by {_holder_text(holder)}; nothing was done",
                               hint=f"wait for it to finish, or stop it (kill {holder.get('pid', 'PID')}{where}); "
                                    f"its lock is {shlex.quote(str(path))}") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, _read(fd)
        os.close(fd)
    raise Sd3tuneError(f"cannot lock {path}: it keeps changing", hint="try again")


@contextmanager
def folder_lock(folder: Path, what: str, on_note: Callable[[str], None] | None = None,
                create: bool = False) -> Iterator[Path]:
    """Hold ``folder/.lock`` while the block runs, or refuse at once with an Sd3tuneError naming the holder. ``what``
    names this command in the lock file (its command line is recorded too). ``create``: make ``folder`` when it does
    not exist (and remove it afterwards when nothing was written to it)."""
    folder = Path(folder)
    made = create and not folder.exists()
    if made:
        try:
            folder.mkdir(parents=True)
        except OSError as exc:
            raise Sd3tuneError(f"cannot create the folder {folder}: {exc.strerror or exc}",
                               hint="pass a folder you can write to") from None
    path = folder / LOCK_NAME
    try:
        fd, stale = _open_locked(path, what)
    except BaseException:
        _remove_if_empty(folder, made)
        raise
    try:
        if stale and on_note:
            on_note(f"took over the lock {path} of {_holder_text(stale)}: that process is gone")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "what": what, "command": shlex.join(["sd3tune", *sys.argv[1:]]) if sys.argv else what}
        data = json.dumps(info).encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        yield path
    finally:
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                path.unlink()  # before the flock goes: see the module's docstring
        except OSError:
            pass
        os.close(fd)
        _remove_if_empty(folder, made)


def _remove_if_empty(folder: Path, made: bool) -> None:
    try:
        if made and not any(folder.iterdir()):
            folder.rmdir()
    except OSError:
        pass


def claim_name(folder: Path, stem: str, suffix: str = ".png", into: list[Path] | None = None) -> Path:
    """``folder/stem.png``, or ``stem-2.png``... when that name is taken: created empty with ``O_EXCL``, so no other
    process (or thread) picks the same name; the caller writes it (atomically) or removes it. With ``into``, the name
    is appended there in one step with its creation: a Ctrl-C cannot fall between them (it left an empty PNG that
    no clean-up knew of), so a caller that removes the empty names it listed leaves none behind."""
    with _ctrl_c_held() if into is not None else nullcontext():
        path = _create_free_name(folder, stem, suffix)
        if into is not None:
            into.append(path)
    return path


def _create_free_name(folder: Path, stem: str, suffix: str) -> Path:
    n = 1
    while True:
        candidate = folder / (f"{stem}{suffix}" if n == 1 else f"{stem}-{n}{suffix}")
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
            return candidate
        except FileExistsError:
            n += 1
        except OSError as exc:
            raise Sd3tuneError(f"cannot write {candidate}: {exc.strerror or exc}",
                               hint="choose a folder you can write to") from None


@contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """Ctrl-C (SIGINT) held back while the block runs, then delivered as it would have been. Only the main thread sets
    handlers, and Python raises KeyboardInterrupt only there: elsewhere, or under a handler set outside Python, the
    block runs as it is."""
    import signal
    import threading

    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    held: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            signal.raise_signal(signal.SIGINT)
