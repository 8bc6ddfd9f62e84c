"""A run folder: the --out of `convc train`, which convc owns and one trainer holds.

Two promises:

* **Nothing a user wrote is overwritten.** convc writes only into a folder
  that is empty or that it made. A folder it made holds a manifest,
  ``.convc-run.json``, that names the files convc wrote there and the convc
  version that made it; a name is added to it before the file is first
  written. A folder that holds other files (say a project folder, or a
  user's own ``model.py``) is refused with a message naming the files that
  would be replaced, unless the caller passes ``overwrite``; even then convc
  replaces only the files it is about to write and deletes only files the
  manifest says it wrote. Folders written by convc before the manifest
  existed are recognised by their checkpoints.
* **One trainer at a time.** The trainer holds an exclusive ``flock`` on
  ``.convc-lock`` in the folder for as long as it runs; the kernel releases
  it when the process ends, however it ends, so a crash never leaves a
  stale lock. A second trainer on the same folder is refused at once.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from convc.errors import ConvcError
from convc.runtime.atomic import TEMP_NAME, write_atomic
from convc.runtime.checkpoint import CHECKPOINT_NAME

MANIFEST_NAME = ".convc-run.json"
LOCK_NAME = ".convc-lock"
MANIFEST_FORMAT = 1
_OWN_NAMES = (MANIFEST_NAME, LOCK_NAME)


def _plain_name(name: object) -> bool:
    """A file name in the folder itself: no separators, no '.' or '..'."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
            and "\\" not in name and "\0" not in name)


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The manifest of ``folder`` ({"format", "convc_version", "files"}), None if it has none."""
    path = Path(folder) / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConvcError(f"{path}: cannot read convc's run manifest ({exc}); remove it only "
                         f"if every file in the folder may be replaced") from None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list) or not all(_plain_name(f) for f in files):
        raise ConvcError(f"{path}: not a valid convc run manifest (it must be JSON with a "
                         f"list of plain file names under \"files\"); remove it only if every "
                         f"file in the folder may be replaced")
    return {"format": data.get("format"), "convc_version": data.get("convc_version"),
            "files": sorted(set(files))}


def _lock(folder: Path) -> int | None:
    """An exclusive flock on ``folder/.convc-lock`` (the open descriptor), or ConvcError."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one trainer per folder is then the user's job
        return None
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as exc:
        raise ConvcError(f"cannot lock {folder}: {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            who = f" (process {holder})" if holder.isdigit() else ""
            raise ConvcError(f"{folder} is in use by another training run{who}; wait for it "
                             f"to finish, or choose another --out") from None
        raise ConvcError(f"cannot lock {folder}: {exc.strerror or exc}") from None
    try:  # who holds it, for the message a second trainer gets; the flock is the lock
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except OSError:  # a full disk: the run then stops at its first real write
        pass
    return fd


class RunFolder:
    """An output folder this process holds: its manifest and its lock.

    Made by ``open_run_folder``; ``write`` records a file in the manifest and
    writes it atomically; ``close`` releases the lock (the kernel does so
    too when the process ends).
    """

    def __init__(self, path: Path, lock_fd: int | None, files: list[str], version: str):
        self.path = path
        self._lock_fd = lock_fd
        self.files = sorted(files)
        self.version = version

    def _save_manifest(self) -> None:
        text = json.dumps({"format": MANIFEST_FORMAT, "convc_version": self.version,
                           "files": self.files}, indent=1) + "\n"
        write_atomic(self.path / MANIFEST_NAME, text)

    def claim(self, name: str) -> Path:
        """Record ``name`` as convc's before it is first written; returns its path."""
        if name not in self.files:
            self.files = sorted(set(self.files) | {name})
            self._save_manifest()
        return self.path / name

    def write(self, name: str, content) -> Path:
        """Claim ``name`` and replace it atomically with ``content`` (see write_atomic)."""
        return write_atomic(self.claim(name), content)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def open_run_folder(out: str | os.PathLike, outputs: tuple[str, ...], *, overwrite: bool,
                    version: str, what: str = "training") -> tuple[RunFolder, list[str]]:
    """Create or take over ``out`` for a run that writes ``outputs`` (plain names).

    Returns the locked folder and the names of the previous outputs that
    convc wrote there (the files ``overwrite`` may delete). Raises ConvcError
    when another process holds the folder, or when it holds files convc did
    not write and ``overwrite`` is false.
    """
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConvcError(f"cannot create output folder {folder}: {exc.strerror or exc}") from None
    if not folder.is_dir():
        raise ConvcError(f"output folder {folder} is not a folder")
    if not os.access(folder, os.W_OK):
        raise ConvcError(f"output folder {folder} is not writable")
    had_lock_file = (folder / LOCK_NAME).exists()
    lock_fd = _lock(folder)
    try:
        manifest = read_manifest(folder)
        entries = sorted(p.name for p in folder.iterdir())
        ours = set(outputs) | set(manifest["files"] if manifest else ())
        for name in entries:
            # Temporaries of an atomic write that a killed run left behind (checkpoint
            # temporaries are swept by the next save_checkpoint).
            if TEMP_NAME.match(name) and name[1:-13] in ours:
                (folder / name).unlink(missing_ok=True)
        present = [n for n in entries if n not in _OWN_NAMES and (folder / n).exists()]
        checkpoints = [n for n in present if CHECKPOINT_NAME.match(n)]
        if manifest is not None:
            owned = set(manifest["files"])
        elif checkpoints:
            # A run written before convc kept a manifest: its outputs are convc's.
            owned = {n for n in outputs if n in present}
        else:
            owned = set()
        foreign = [n for n in present if n not in owned and not CHECKPOINT_NAME.match(n)]
        clobbered = [n for n in outputs if n in foreign]
        refuse = clobbered if manifest is not None or checkpoints else foreign
        if refuse and not overwrite:
            if clobbered:
                problem = (f"{what} would overwrite {', '.join(clobbered)}, which convc did "
                           f"not write")
            else:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more"
                                                  if len(foreign) > 5 else "")
                problem = (f"it is not empty and was not made by convc (it holds {shown})")
            raise ConvcError(
                f"{folder}: {problem}; choose an empty or new folder, or pass --overwrite "
                f"(overwrite=True) to write {', '.join(outputs)} there anyway (other files "
                f"are never touched)")
        run = RunFolder(folder, lock_fd, sorted(owned), version)
        run._save_manifest()
    except BaseException:
        if lock_fd is not None:
            if not had_lock_file:  # a refused folder is left as it was found
                (folder / LOCK_NAME).unlink(missing_ok=True)
            os.close(lock_fd)
        raise
    return run, sorted(n for n in owned if n in outputs and n in present)
