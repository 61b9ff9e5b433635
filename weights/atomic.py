"""Atomic writes: every file scfm writes goes through a temp file beside it and a rename, so a crash never leaves
half a file under the final name; the temp is made with the user's umask, and names its host and process so that
what a killed write left is removed later without touching a live writer's. The rename is made durable too
(`durable_replace`): the data is on the disk before it, the folder entry after it, so a power loss cannot leave an
empty file under the final name either."""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .io import WeightsError

try:
    import fcntl  # POSIX: a stale lock's take-over holds an flock (folder_lock)
except ImportError:  # Windows, which never takes a lock over: it has no harmless pid probe (_pid_alive)
    fcntl = None


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None,
                *, overwrite: bool = False) -> Path:
    """Write a safetensors file through a temp file and a rename, so a crash never leaves half a file."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise WeightsError(f"{path} exists; pass overwrite=True (or --overwrite) to replace it")
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    return path


def _writer_token() -> str:
    """Where a pid names one process: the host name (letters, digits and '-' only, so it holds no '.'), and on
    Linux the PID namespace, as containers sharing a host name (docker --network host) have their own pids."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"
    try:
        return f"{host}-{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return host


_WRITER = _writer_token()


def _pid_alive(pid: int) -> bool:
    if os.name != "posix" or pid <= 0:
        return True  # no harmless probe (Windows' os.kill ends the process): count it alive, never delete
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the pid exists
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: alive, another user's
    return True


def temp_writer_gone(tmp: str | os.PathLike) -> bool:
    """Whether the process that made the temp file or folder `tmp` (named by `temp_beside`,
    `.NAME.<host>.<pid>.<random>.tmp`) is gone, so that `tmp` is what a killed write left and safe to delete.

    True only for a name made on this host (and PID namespace) whose pid no process holds now. False for a
    live writer (whatever it writes: a training run's export beside a running `distill.export`), another
    host's temp on a shared disk (its pids are not ours to probe), and any other name, including the older
    `.NAME.<random>.tmp`: when unsure, keep it. A reused pid reads as alive, which only keeps a file longer."""
    parts = Path(tmp).name.rsplit(".", 4)  # [".NAME", host, pid, random, "tmp"]
    return len(parts) == 5 and len(parts[0]) >= 2 and parts[4] == "tmp" and _gone(parts[1], parts[2])


def _gone(writer: str, pid: str) -> bool:
    """Whether `writer` (a `_WRITER`) and `pid`, as a temp name or a lock states them, name a process gone from
    this host; never one of another host, whose pids are not ours to probe."""
    return writer == _WRITER and pid.isdigit() and not _pid_alive(int(pid))


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temp files and folders that `temp_beside` made for `path` itself (the same NAME, beside it) in
    processes now gone (see `temp_writer_gone`); return what was removed. Writers call it before their own
    write, so a write killed once leaves nothing after the next success. Best effort: a temp that cannot be
    removed stays, and the write goes on."""
    path = Path(path)
    prefix = f".{path.name}."
    removed = []
    try:
        names = [e.name for e in os.scandir(path.parent) if e.name.startswith(prefix) and e.name.endswith(".tmp")]
    except OSError:
        return removed
    for name in names:
        tmp = path.parent / name
        if name.rsplit(".", 4)[0] != prefix[:-1] or not temp_writer_gone(tmp):
            continue  # a longer NAME's temp (`.NAME.partial.…`), a live writer's, another host's
        try:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass  # a racing cleaner took it, or no permission: harmless
    return removed


def temp_beside(path: Path, *, folder: bool = False) -> Path:
    """A new, empty file (or folder) `.NAME.<host>.<pid>.<random>.tmp` beside `path`, to be renamed onto it
    once complete. Host and pid tell a later run whether the writer is gone (`temp_writer_gone`), so what a
    killed write left can be removed without touching a live one (`remove_stale_temps`).

    Created with mode 0666 (0777) for the OS to take the umask off, as for any open(): tempfile's mkstemp and
    mkdtemp make 0600 / 0700, the rename keeps that, and no other user (a ComfyUI in Docker, a web server)
    could read what we wrote. Asking the OS to apply the umask also spares reading it, which POSIX allows only
    by setting it, a race with other threads. O_EXCL makes the name ours alone, as mkstemp does."""
    for _ in range(10):
        tmp = path.parent / f".{path.name}.{_WRITER}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            if folder:
                os.mkdir(tmp, 0o777)
            else:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
                os.close(os.open(tmp, flags, 0o666))
            return tmp
        except FileExistsError:
            continue  # another writer drew the same name: draw again
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}; delete its .{path.name}.*.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp file beside `path` (see `temp_beside`) for the block to write; renamed onto `path` when the block
    ends (flushed to the disk before and after, see `durable_replace`), deleted if it raises or the flush fails,
    so neither a crash nor a power loss leaves half a file under the final name. The file keeps the
    mode the umask gave the temp file even when the block's writer replaced it: safetensors' save_file writes
    its own 0600 file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_beside(path)
    mode = stat.S_IMODE(tmp.stat().st_mode)
    try:
        yield tmp
        os.chmod(tmp, mode)
        durable_replace(tmp, path)
    except SafetensorError as e:  # safetensors' own error for a failed write, a full disk included
        raise _os_error(e, tmp) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _os_error(e: SafetensorError, path: Path) -> OSError:
    """safetensors (0.4-0.8) reports a failed write as a SafetensorError, not an OSError, with the OS's error
    inside its text ("... No space left on device (os error 28)"): the OSError it stands for, which every writer
    turns into its one-line advice."""
    found = re.search(r"os error (\d+)", str(e))
    code = int(found.group(1)) if found else errno.EIO
    return OSError(code, os.strerror(code) if found else str(e), str(path))


def fsync_path(path: str | os.PathLike) -> None:
    """Flush one file's data and metadata (its size, its mode) to the disk, by name; OSError when they cannot be
    written (a full disk that delayed allocation, as in ext4 and XFS, only finds out now)."""
    # POSIX fsync takes a read-only descriptor, which also opens a file the umask left read-only (0444); Windows'
    # fsync (_commit) needs a handle that may write.
    fd = os.open(path, os.O_RDONLY if os.name == "posix" else os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# fsync errors meaning "this file system does not sync folders" (some network and FUSE ones), not a failed write.
_NO_DIR_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it, a new or removed name) to the disk. A rename lives in its
    folder, not in the file: until the folder is flushed a power loss can undo it, and a write reported done is
    gone, along with whatever its caller removed in the belief that it was safe (a source, older checkpoints).

    Best effort where there is nothing to flush: Windows cannot open a folder (and NTFS journals the rename
    itself), a folder without read permission cannot be opened, and some file systems refuse to sync one."""
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except PermissionError:
        return  # a write-only folder (mode 0300): the rename stands, only its durability is not ours to force
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _NO_DIR_SYNC:
            raise  # EIO: the disk failed; say so rather than report a write that may not survive
    finally:
        os.close(fd)


def durable_replace(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """`os.replace(tmp, path)` that a power loss cannot leave half done. The temp file (or every file and folder
    in a temp folder) is flushed first: file systems that write data late (ext4, XFS) may put the rename on the
    disk before the data, leaving an empty or partial file under the final name, and the file it replaced
    already gone. The folder holding `path` is flushed after, so that the rename itself is on the disk when this
    returns (see `fsync_dir`). On OSError before the rename, `path` is untouched and `tmp` is the caller's."""
    tmp, path = Path(tmp), Path(path)
    if tmp.is_dir() and not tmp.is_symlink():
        for root, _, files in os.walk(tmp, topdown=False):  # innermost first, each folder after its files
            for name in files:
                if not os.path.islink(os.path.join(root, name)):  # a link's target is not ours to flush
                    fsync_path(os.path.join(root, name))
            fsync_dir(root)
    else:
        fsync_path(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _take_over(lock: Path) -> str | None:
    """Delete `lock` if it is still the file of a process gone on this host; None when it is gone or was
    deleted (try to create it again), the reason otherwise (a one-line error's end) when it cannot be taken over.

    Two runs that both found the same killed run's lock would otherwise both delete "it" and create their own:
    the later delete removes the earlier run's new lock and both hold the folder. So the take-over holds an
    flock on the stale file itself while it checks, under that flock, that the name still points to this very
    file and that the file still names a gone process, and only then deletes it: the second run waits, then
    finds the name gone or pointing to the first run's live lock, and leaves it. The kernel drops an flock
    when its process dies, so a run killed mid-take-over blocks no one. Where flock is refused (some network
    and FUSE file systems; Windows has no pid probe to get this far) nothing is taken over."""
    if fcntl is None:
        return "this system cannot lock it to take it over safely"
    fd = None
    for mode in (os.O_RDWR, os.O_RDONLY):  # NFS emulates flock with POSIX locks: an exclusive one needs O_RDWR
        try:
            fd = os.open(lock, mode | getattr(os, "O_CLOEXEC", 0))
            break
        except FileNotFoundError:
            return None  # another run took it over, or its owner ended: try again
        except PermissionError:
            continue  # read-only to us (a umask of 0222): a local flock needs no more
        except OSError as e:
            return f"it cannot be opened ({e.strerror})"
    if fd is None:
        return "it cannot be opened (permission denied)"
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while another run checks and deletes this same file
        except OSError as e:
            return f"this file system cannot lock it to take it over safely ({e.strerror})"
        try:
            mine, now = os.fstat(fd), os.stat(lock)
        except FileNotFoundError:
            return None
        if (mine.st_dev, mine.st_ino) != (now.st_dev, now.st_ino):
            return None  # the name is another run's lock now, made after this file was deleted: judge that one
        # the open file keeps its inode, so a new lock cannot reuse the number; read it, not the name, to judge
        writer, _, pid = os.read(fd, 4096).decode(errors="replace").strip().rpartition(" ")
        if _gone(writer, pid):
            lock.unlink(missing_ok=True)  # no one else deletes it while we hold its flock: its owner is gone
        return None
    finally:
        os.close(fd)  # drops the flock, after the delete


def _lock_owner(lock: Path) -> tuple[str, str] | None:
    """The host and pid `lock` names, or None once it is gone (its owner ended: try again). A lock is made empty,
    then written, so one without its closing newline is read again for a moment before it counts as naming no
    one (a run killed in between, or a hand-made file)."""
    for _ in range(20):
        try:
            text = lock.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            return "", ""
        if text.endswith("\n"):
            break
        time.sleep(0.005)
    writer, _, pid = text.strip().rpartition(" ")
    return writer, pid


def _where(writer: str, pid: str) -> str:
    return f"process {pid} on this machine" if writer == _WRITER else f"host {writer or '?'}, pid {pid or '?'}"


def lock_holder(folder: str | os.PathLike) -> str | None:
    """Who holds `folder`'s lock (folder_lock), in its words ("process 12 on this machine", "host h, pid 4"), for a
    reader that must not take a folder a run is still writing (distill/dataset.py: a make_dataset folder); None
    when no other live run does: no lock, this process's own, or one whose process is gone on this host."""
    owner = _lock_owner(Path(folder) / ".scfm.lock")
    if owner is None:
        return None
    writer, pid = owner
    if _gone(writer, pid) or (writer == _WRITER and pid.isdigit() and int(pid) == os.getpid()):
        return None
    return _where(writer, pid)


@contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold `folder/.scfm.lock` while the block runs: a second process `what` (a training run) on the same folder
    is refused in one line instead of interleaving its checkpoints and log with the first's. The lock names its
    host and pid as temp files do (`temp_beside`); one whose process is gone on this host is taken over, one from
    another host (a shared disk) is not ours to judge, and the message says how to clear it. Runs that find the
    same gone process's lock at once take it over one at a time (`_take_over`), so exactly one of them holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".scfm.lock"
    for _ in range(10):  # each retry follows a lock deleted by its owner or a take-over: a few at most
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is None:
                continue
            writer, pid = owner
            if _gone(writer, pid):
                why = _take_over(lock)  # a killed run's
                if why is None:
                    continue
                raise WeightsError(f"{folder}: {lock} was left by a killed {what} (process {pid}, gone), but {why}; "
                                   f"delete it and run again") from None
            where = _where(writer, pid)
            raise WeightsError(f"{folder}: another {what} is using it ({where}); wait for it to end, or choose "
                               f"another folder (delete {lock} only if that process is gone)") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{_WRITER} {os.getpid()}\n")
        break
    else:
        raise WeightsError(f"{folder}: its lock {lock} keeps changing (runs starting and ending on it); wait "
                           f"for them, or choose another folder")
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)
