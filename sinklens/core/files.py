"""Writing files whole or not at all, with write failures raised as :class:`~sinklens.core.errors.WriteError`.

Every file sinklens writes into a run folder (figures, tables, JSON, the run manifest, the report) goes through
:func:`atomic_path`: the content is written into a temporary file beside the destination and renamed onto it
(``os.replace``, atomic on one file system), so a full disk, a read-only folder or a killed process never leaves
a truncated file where a reader expects a complete one; an earlier file of the same name stays as it was. Any
``OSError`` becomes a ``WriteError`` naming the destination and the cause (e.g. "No space left on device").
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import WriteError


def cause(err: BaseException) -> str:
    """The reason of an OS or library error as a reader wants it: ``strerror`` ("No space left on device") when
    there is one, else the error's text.

    Args:
        err: the error raised by the write.
    """
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return text.rstrip(".")


LEFT = "Nothing half-written was left (an earlier file of that name is unchanged)"
FIX = "free disk space or pick a writable folder"


def write_error(path: str | os.PathLike, err: BaseException, what: str = "file", left: str = LEFT,
                fix: str = FIX) -> WriteError:
    """The :class:`WriteError` of a failed write of ``path`` (to raise ``from err``):
    "Cannot write <what> <path>: <cause>. <left>; <fix>."

    Args:
        path: the destination that could not be written.
        err: the underlying error (its cause is quoted).
        what: what ``path`` is, for the message ("file", "run manifest", "results file", ...).
        left: what the failure left behind (by default: nothing half-written, an earlier file unchanged).
        fix: what the reader can do.
    """
    error = WriteError(f"Cannot write {what} {path}: {cause(err)}. {left}; {fix}.")
    error.errno = getattr(err, "errno", None)  # e.g. errno.ENOSPC, for callers that branch on it
    error.path = Path(path)
    return error


@contextmanager
def atomic_path(path: str | os.PathLike, what: str = "file") -> Iterator[Path]:
    """Context manager yielding a temporary path beside ``path`` to write into; renamed onto ``path`` on success.

    The temporary file keeps ``path``'s suffix (writers that look at it see the same one) and is removed if the
    body raises. An ``OSError`` in the body or in the rename is raised as :class:`WriteError` naming ``path`` and
    the cause; other errors pass through unchanged (the temporary file is still removed).

    Args:
        path: the destination file; its folder must exist.
        what: what ``path`` is, for the error message.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except WriteError:
        raise
    except OSError as err:
        raise write_error(path, err, what) from err
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "file", encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` whole or not at all (see :func:`atomic_path`); returns ``path``.

    Args:
        path: the destination file; its folder must exist.
        text: the content.
        what: what ``path`` is, for the error message.
        encoding: the text encoding.
    """
    with atomic_path(path, what) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, what: str = "file") -> Path:
    """Write ``data`` to ``path`` whole or not at all (see :func:`atomic_path`); returns ``path``.

    Args:
        path: the destination file; its folder must exist.
        data: the content.
        what: what ``path`` is, for the error message.
    """
    with atomic_path(path, what) as tmp:
        tmp.write_bytes(data)
    return Path(path)


# --- who made a temporary folder, and is it still alive ----------------------------------------------------------

OWNER_PATTERN = r"[0-9a-f]{6}-[0-9a-f]{6}-\d+-\d+"  # host-boot-pid-start, see owner_tag()


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:6]


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks after boot, /proc/<pid>/stat field 22); 0 where /proc is missing,
    None if the process does not exist or is a zombie (dead, not yet reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except FileNotFoundError:
        return None if Path("/proc/self/stat").exists() else 0
    except OSError:
        return 0
    if fields and fields[0] in ("Z", "X"):
        return None
    return int(fields[19]) if len(fields) > 19 else 0


def owner_tag() -> str:
    """This process's identity for the names of its temporary folders: ``<host>-<boot>-<pid>-<start>``.

    ``host`` and ``boot`` are short hashes of the host name and of the kernel's boot id, ``start`` the process's
    start time in clock ticks after boot (0 where the system has no /proc). Together they tell a folder of a live
    process from the leftover of a killed one, also after the pid was reused or the machine rebooted, and a folder
    of another machine sharing the file system (never taken for a leftover) from one of this machine.
    """
    boot = _boot_id()
    return f"{_short_hash(socket.gethostname())}-{_short_hash(boot) if boot else '0' * 6}-{os.getpid()}-" \
           f"{_start_ticks(os.getpid()) or 0}"


def owner_gone(tag: str) -> bool:
    """Whether the process an :func:`owner_tag` names has ended (its folders are leftovers, safe to remove).

    False when in doubt: a tag of another machine (that process may still be writing), a malformed tag, or a live
    process of this pid whose start time cannot be read.

    Args:
        tag: the ``<host>-<boot>-<pid>-<start>`` of :func:`owner_tag`.
    """
    match = re.fullmatch(r"([0-9a-f]{6})-([0-9a-f]{6})-(\d+)-(\d+)", tag)
    if match is None:
        return False
    host, boot, pid, start = match.group(1), match.group(2), int(match.group(3)), int(match.group(4))
    if host != _short_hash(socket.gethostname()):
        return False
    mine = _boot_id()
    if boot != (_short_hash(mine) if mine else "0" * 6):
        return True  # made before the last reboot
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    except OSError:
        return False
    now = _start_ticks(pid)
    if now is None:
        return True  # a zombie, or gone since the kill(0) above
    return bool(start and now and now != start)  # the pid was reused by a newer process


__all__ = ["OWNER_PATTERN", "atomic_path", "atomic_write_bytes", "atomic_write_text", "cause", "owner_gone",
           "owner_tag", "write_error"]
