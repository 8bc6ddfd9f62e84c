"""Write a file so that a crash, a kill or a full disk never leaves half of it.

Every file convc writes that a user may have edited, or that a run needs
(a formatted spec, a generated module, a log, a picture, predictions,
checkpoints), goes through ``write_atomic``: the bytes go to a temporary
file in the same folder, are flushed and fsync-ed, the temporary is renamed
over the target with ``os.replace`` (atomic on POSIX and Windows within one
file system), and the folder is fsync-ed so the rename survives a power cut.
A reader, and the next convc command, sees the old file or the new one,
never a mixture. When a write fails (ENOSPC, EFBIG, EIO, Ctrl-C) the
temporary is removed and the old file is untouched.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path
from typing import BinaryIO, Callable, Union

# What write_atomic names its temporaries: ".<name>.<8 hex digits>.tmp".
TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")

Content = Union[bytes, str, Callable[[BinaryIO], None]]


def temporary_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``path`` (same folder, so the rename is atomic)."""
    path = Path(path)
    return path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable.

    POSIX only: Windows cannot open a directory as a file, and NTFS journals
    renames itself.
    """
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_atomic(path: str | os.PathLike, content: Content, *,
                 temporary: str | os.PathLike | None = None) -> Path:
    """Replace ``path`` with ``content`` atomically; returns the path written.

    ``content`` is bytes, text (written as UTF-8, newlines as given) or a
    function that writes to a binary stream (``np.save``, ``savefig``).
    ``temporary`` names the temporary file where a caller sweeps its own
    (checkpoints); by default it is ``temporary_path(path)``.

    The new file keeps the permission bits of the file it replaces; a new
    file gets 0o666 less the umask, as any file the user creates (mkstemp's
    0o600 would hide a generated module from the user's group). A symbolic
    link is followed: the file it points to is replaced, the link stays.
    Raises OSError, with the temporary removed, when the write fails.
    """
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = None
    temp = Path(temporary) if temporary is not None else temporary_path(path)
    # O_EXCL with a random name: never clobber a file we did not create.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                 0o666)
    try:
        try:
            if callable(content):
                with os.fdopen(os.dup(fd), "wb") as stream:
                    content(stream)
            else:
                _write_all(fd, content.encode("utf-8") if isinstance(content, str)
                           else bytes(content))
            if mode is not None:
                os.fchmod(fd, mode) if hasattr(os, "fchmod") else os.chmod(temp, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        # A full disk, a bug or Ctrl-C: leave no temporary behind.
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    fsync_folder(path.parent)
    return path


def _same_file(a: Path, b: Path) -> bool:
    """Whether a and b name one file: the same path after links, or the same inode."""
    if Path(os.path.realpath(a)) == Path(os.path.realpath(b)):
        return True
    try:
        return os.path.samefile(a, b)  # a hard link
    except OSError:
        return False


def check_output(path: str | os.PathLike,
                 protected: tuple[str | os.PathLike, ...] = ()) -> None:
    """Refuse, as a ConvcError that says why, an output file the user named (``-o``,
    ``--json``, ``--png``) that would replace a ``.cell`` file or one of ``protected``
    (the spec being compiled, the files it imports, a checkpoint or data file the
    command reads), compared after following links and by inode (hard links)."""
    from convc.errors import ConvcError

    path = Path(path)
    real = Path(os.path.realpath(path))
    shown = str(path) if real.name == path.name and not path.is_symlink() else f"{path} (-> {real})"
    if any(_same_file(real, Path(p)) for p in protected):
        raise ConvcError(f"refusing to write {shown}: it is an input of this command "
                         f"(choose another output file)")
    if real.suffix == ".cell" or path.suffix == ".cell":
        raise ConvcError(f"refusing to write {shown}: it is a .cell file, and convc never "
                         f"replaces a spec with its output (choose another output file)")
    if real.is_dir():
        raise ConvcError(f"cannot write {path}: it is a folder")


def write_output(path: str | os.PathLike, content: Content, *,
                 protected: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Write a file the user named on the command line: ``check_output``, then its
    folder is made and the file written with ``write_atomic``. An OSError becomes a
    ConvcError naming the file."""
    from convc.errors import ConvcError

    check_output(path, protected)
    path = Path(path)
    try:
        if path.parent != Path(""):
            path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomic(path, content)
    except OSError as exc:
        raise ConvcError(f"cannot write {path}: {exc.strerror or exc}") from None
