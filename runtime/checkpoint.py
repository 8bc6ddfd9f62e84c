"""Crash-safe checkpoints: one ``ckpt-{step:08d}.npz`` file per saved step in a run folder.

The promise is that a crash, a full disk or a kill at any moment never costs
more than the steps since the last checkpoint, and never leaves a damaged
file that is mistaken for a good one. Three mechanisms keep it:

* **Atomic replace** (``convc.runtime.atomic``, shared by every file convc
  writes). A checkpoint is written to a temporary file in the same folder,
  flushed and fsync-ed, then renamed into place with ``os.replace`` (atomic
  on POSIX and Windows within one file system), and the folder is fsync-ed
  so the rename itself survives a power cut. A reader therefore sees
  either the old set of files or the new one, never half a file under a
  checkpoint name.
* **A checksum.** The metadata entry holds a sha256 over every array's name,
  dtype, shape and bytes, and over the metadata itself. A flipped bit or a
  file truncated by a dying disk is detected on load, and
  ``latest_valid_checkpoint`` falls back to the previous checkpoint.
* **No code execution on load.** Files are read with
  ``np.load(..., allow_pickle=False)``, so a checkpoint from an untrusted
  source can at worst fail to load.

File layout: a standard ``.npz`` (an uncompressed zip of ``.npy`` files) whose
entries are the caller's arrays, named ``"<group>/<name>"`` (for example
``"param/enc.W"``, ``"optim/m/enc.W"``, ``"rng/state"``), plus ``"__meta__"``:
a uint8 array holding UTF-8 JSON with the format version, step, epoch, data
position, the caller's metadata and the checksum. Any tool that reads npz
files can open a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from convc.errors import CheckpointError
from convc.runtime.atomic import write_atomic
from convc.runtime.optim import array_module

FORMAT_VERSION = 1
META_KEY = "__meta__"
CHECKPOINT_NAME = re.compile(r"^ckpt-(\d{8,})\.npz$")
TEMP_NAME = re.compile(r"^\.ckpt-.*\.tmp$")
ZIP_MAGIC = b"PK\x03\x04"  # every npz file starts with a zip local file header

# Plain numeric data only: bool, signed/unsigned integers, floats, complex.
# Anything else (objects, strings, datetimes) belongs in the JSON metadata.
_ALLOWED_DTYPE_KINDS = "biufc"


def checkpoint_path(folder: str | os.PathLike, step: int) -> Path:
    """The file name a checkpoint for ``step`` gets in ``folder``."""
    return Path(folder) / f"ckpt-{step:08d}.npz"


def flatten_groups(groups: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{"param": {"enc.W": a}}`` -> ``{"param/enc.W": a}``, the naming checkpoints use."""
    flat = {}
    for group in sorted(groups):
        if not group or "/" in group:
            raise CheckpointError(f"checkpoint group name {group!r} must be non-empty without '/'")
        for name in sorted(groups[group]):
            flat[f"{group}/{name}"] = groups[group][name]
    return flat


def split_groups(arrays: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Inverse of ``flatten_groups``: split each name at its first '/'."""
    groups: dict[str, dict[str, Any]] = {}
    for key in sorted(arrays):
        group, _, name = key.partition("/")
        groups.setdefault(group, {})[name] = arrays[key]
    return groups


def _to_numpy(name: str, value: Any) -> np.ndarray:
    """Bring one array to host memory as NumPy, refusing dtypes that would need pickle."""
    xp = array_module(value)
    array = np.asarray(value) if xp is np else xp.asnumpy(value)
    if array.dtype.kind not in _ALLOWED_DTYPE_KINDS:
        raise CheckpointError(
            f"cannot checkpoint {name!r}: dtype {array.dtype} is not a plain numeric type")
    return array


def _checksum(arrays: dict[str, np.ndarray], meta_without_checksum: dict[str, Any]) -> str:
    """sha256 over the metadata and every array's name, dtype, shape and bytes.

    Each array contributes a JSON header line (name, dtype with byte order,
    shape, byte count) and then its bytes in C order, in sorted-name order.
    The header lines make the byte stream unambiguous: two different sets of
    arrays cannot produce the same stream by shifting bytes between entries.
    """
    digest = hashlib.sha256()
    digest.update(_canonical_json(meta_without_checksum).encode("utf-8") + b"\n")
    for name in sorted(arrays):
        array = arrays[name]
        header = json.dumps([name, array.dtype.str, list(array.shape), array.nbytes])
        digest.update(header.encode("utf-8") + b"\n")
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _json_default(value: Any) -> Any:
    """Let NumPy scalars and small arrays appear in user metadata."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Checkpoint files in ``folder``, oldest step first. A missing folder has none."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = CHECKPOINT_NAME.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def save_checkpoint(folder: str | os.PathLike, step: int, arrays: dict[str, Any],
                    meta: dict[str, Any], keep: int | None = 3) -> Path:
    """Write ``arrays`` and ``meta`` as the checkpoint for ``step``; return its path.

    ``arrays`` names must look like ``"group/name"`` (see ``flatten_groups``);
    they may be NumPy or CuPy arrays. ``meta`` must be JSON-serialisable; its
    ``"epoch"`` and ``"data_position"`` entries, if present, are also copied to
    the top level of the stored metadata. After a successful write, all but
    the newest ``keep`` checkpoints (by step) are deleted, never the one just
    written; ``keep=None`` keeps all. Stale temporary files left by an
    earlier crash are removed too, which is why only one process may write
    checkpoints into a folder at a time.

    On any failure to write (full disk, permissions, ...) the temporary file
    is removed, the existing checkpoints are left exactly as they were, and
    CheckpointError is raised naming the file and the reason.
    """
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"checkpoint step must be a non-negative integer, got {step!r}")
    step = int(step)
    if keep is not None and (int(keep) != keep or keep < 1):
        raise CheckpointError(f"keep must be a positive integer or None, got {keep!r}")
    folder = Path(folder)
    final = checkpoint_path(folder, step)

    # Validate and convert everything before touching the disk.
    payload: dict[str, np.ndarray] = {}
    for name in sorted(arrays):
        if not isinstance(name, str) or not re.match(r"^[^/]+/.+", name):
            raise CheckpointError(
                f"checkpoint array name {name!r} must look like 'group/name' "
                "(for example 'param/enc.W')")
        payload[name] = _to_numpy(name, arrays[name])
    try:
        # The round trip makes the metadata exactly what load_checkpoint will
        # return (tuples become lists, NumPy scalars become numbers).
        user_meta = json.loads(json.dumps(meta, default=_json_default))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{final}: metadata is not JSON-serialisable: {exc}") from None
    header: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "epoch": user_meta.get("epoch") if isinstance(user_meta, dict) else None,
        "data_position": user_meta.get("data_position") if isinstance(user_meta, dict) else None,
        "user": user_meta,
    }
    header["checksum"] = _checksum(payload, header)
    meta_bytes = _canonical_json(header).encode("utf-8")
    payload[META_KEY] = np.frombuffer(meta_bytes, dtype=np.uint8)

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"{final}: cannot create folder: {exc.strerror or exc}") from exc

    # A random temporary name the next save sweeps (TEMP_NAME) if this process dies.
    temp = folder / f".ckpt-{step:08d}-{secrets.token_hex(4)}.tmp"
    try:
        write_atomic(final, lambda stream: np.savez(stream, **payload), temporary=temp)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise CheckpointError(f"{final}: could not write checkpoint: {reason}") from exc

    _prune(folder, final, keep)
    return final


def _prune(folder: Path, just_written: Path, keep: int | None) -> None:
    """Delete checkpoints beyond the newest ``keep`` and stale temp files.

    Failing to delete only wastes disk space, so it warns instead of failing
    a save that already succeeded.
    """
    doomed: list[Path] = []
    if keep is not None:
        existing = list_checkpoints(folder)
        doomed += [path for path in existing[:-keep] if path != just_written]
    doomed += [entry for entry in folder.iterdir() if TEMP_NAME.match(entry.name)]
    for path in doomed:
        try:
            _remove_quietly(path)
        except OSError as exc:
            _warn_stderr(f"could not delete old checkpoint file {path}: {exc.strerror or exc}")


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read and verify one checkpoint; return ``(arrays, meta)``.

    ``arrays`` holds every entry except the metadata, by its full
    ``"group/name"``. ``meta`` is the stored metadata: ``format_version``,
    ``step``, ``epoch``, ``data_position``, ``user`` (the dict given to
    ``save_checkpoint``) and ``checksum``. Any problem raises CheckpointError
    naming the file and the reason; a file that loads is bit-for-bit what was
    saved.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with open(path, "rb") as stream:
            magic = stream.read(len(ZIP_MAGIC))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if magic != ZIP_MAGIC:
        # Checked here so that np.load never even considers other formats.
        raise CheckpointError(f"{path}: truncated or not a zip file (not an npz checkpoint)")
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as contents:
            for key in sorted(contents.files):
                arrays[key] = contents[key]
    except CheckpointError:
        raise
    except Exception as exc:
        # A damaged zip fails inside zipfile or numpy in many different ways
        # (BadZipFile, ValueError, EOFError, OSError, struct.error, ...); to
        # the caller they all mean the same: this file cannot be trusted.
        raise CheckpointError(f"{path}: {_describe_read_error(exc)}") from exc

    meta_array = arrays.pop(META_KEY, None)
    if meta_array is None:
        raise CheckpointError(f"{path}: missing metadata entry {META_KEY!r}")
    try:
        if meta_array.dtype != np.uint8 or meta_array.ndim != 1:
            raise ValueError(
                f"metadata entry has dtype {meta_array.dtype}, shape {meta_array.shape}")
        meta = json.loads(meta_array.tobytes().decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("metadata is not a JSON object")
    except ValueError as exc:  # includes UnicodeDecodeError and JSONDecodeError
        raise CheckpointError(f"{path}: unreadable metadata: {exc}") from None

    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: unsupported checkpoint format version {version!r} "
            f"(this convc reads version {FORMAT_VERSION})")
    stored = meta.pop("checksum", None)
    if not isinstance(stored, str):
        raise CheckpointError(f"{path}: metadata has no checksum")
    actual = _checksum(arrays, meta)
    meta["checksum"] = stored
    if actual != stored:
        raise CheckpointError(f"{path}: checksum mismatch (file is corrupted)")

    match = CHECKPOINT_NAME.match(path.name)
    if match and int(match.group(1)) != meta.get("step"):
        raise CheckpointError(
            f"{path}: file name says step {int(match.group(1))} "
            f"but the metadata says step {meta.get('step')!r}")
    return arrays, meta


def _describe_read_error(exc: Exception) -> str:
    """Turn a low-level read failure into the reason shown to the user."""
    import zipfile

    text = str(exc)
    if isinstance(exc, zipfile.BadZipFile) and "not a zip file" in text.lower():
        return "truncated or not a zip file"
    if isinstance(exc, ValueError) and "pickle" in text.lower():
        return ("contains pickled Python objects, which are refused "
                "(loading a checkpoint must never run code)")
    if isinstance(exc, EOFError):
        return f"truncated ({text or 'unexpected end of file'})"
    return f"corrupt or unreadable ({type(exc).__name__}: {text})"


def latest_valid_checkpoint(folder: str | os.PathLike,
                            report: Callable[[str], None] | None = None
                            ) -> tuple[Path, dict[str, np.ndarray], dict[str, Any]] | None:
    """The newest checkpoint in ``folder`` that loads and verifies, or None.

    Invalid ones are skipped, newest first, and each is reported through
    ``report(message)`` (default: a warning on stderr), so resuming after a
    crash that damaged the last file continues from the one before it
    instead of failing, while still telling the user what was lost.
    """
    if report is None:
        report = _warn_stderr
    for path in reversed(list_checkpoints(folder)):
        try:
            arrays, meta = load_checkpoint(path)
        except CheckpointError as exc:
            report(f"skipping invalid checkpoint: {exc}")
            continue
        return path, arrays, meta
    return None


# ---------------------------------------------------------------------------
# What a training run's checkpoint must hold
# ---------------------------------------------------------------------------
# A checksum proves that a file is what was written, not who wrote it: a
# forged file with a recomputed checksum loads. So every field a resume reads
# is checked here, by type, range and shape, before any of it is used.

def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and np.isfinite(value))


_POSITION_FIELDS = {"n": 1, "batch_size": 1, "seed": 0, "epoch": 0, "index": 0}


def validate_run_meta(path: str | os.PathLike, arrays: dict[str, np.ndarray],
                      meta: dict[str, Any]) -> None:
    """Raise CheckpointError naming the first field of a training checkpoint that is
    missing or malformed (``meta`` and ``arrays`` as ``load_checkpoint`` returns them)."""
    def bad(field: str, expected: str, value: Any) -> CheckpointError:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return CheckpointError(f"{path}: metadata field {field} must be {expected}, "
                               f"got {shown}")

    if not _is_int(meta.get("step")):
        raise bad("step", "an integer >= 0", meta.get("step"))
    user = meta.get("user")
    if not isinstance(user, dict):
        raise bad("user", "a JSON object", user)
    if not isinstance(user.get("model"), str):
        raise bad("user.model", "a model name", user.get("model"))
    position = user.get("data_position")
    if not isinstance(position, dict):
        raise bad("user.data_position", "an object with " + ", ".join(_POSITION_FIELDS),
                  position)
    for key, low in _POSITION_FIELDS.items():
        if not _is_int(position.get(key), low):
            raise bad(f"user.data_position.{key}", f"an integer >= {low}", position.get(key))
    if position["index"] > position["n"]:
        raise bad("user.data_position.index", f"at most n = {position['n']}", position["index"])
    try:
        np.random.PCG64().state = user.get("rng")
    except (TypeError, ValueError, KeyError, OverflowError) as exc:
        raise bad("user.rng", f"a NumPy PCG64 state ({type(exc).__name__}: {exc})",
                  user.get("rng")) from None
    if not _is_number(user.get("seconds", 0.0)) or user.get("seconds", 0.0) < 0:
        raise bad("user.seconds", "a number of seconds >= 0", user.get("seconds"))
    if not isinstance(user.get("config", {}), dict):
        raise bad("user.config", "a JSON object", user.get("config"))
    for key in ("best_val_loss",):
        if user.get(key) is not None and not _is_number(user[key]):
            raise bad(f"user.{key}", "a finite number or null", user[key])
    for key in ("best_step",):
        if user.get(key) is not None and not _is_int(user[key]):
            raise bad(f"user.{key}", "an integer >= 0 or null", user[key])
    if not _is_int(user.get("bad_validations", 0)):
        raise bad("user.bad_validations", "an integer >= 0", user.get("bad_validations"))
    # Counters and scalar schedule state are single numbers; the rest of the
    # arrays (parameters, optimizer slots, carried states) are checked against
    # the model's shapes where they are used.
    for name in sorted(arrays):
        group, _, entry = name.partition("/")
        array = arrays[name]
        if group == "sched" or (group == "optim" and entry == "t"):
            if array.ndim != 0 or array.dtype.kind not in "iuf" or not np.isfinite(array):
                raise CheckpointError(f"{path}: array {name} must be one finite number, got "
                                      f"dtype {array.dtype}, shape {array.shape}")
