"""A model's parameters as a `.safetensors` file: `convc.save_params`, `convc.load_params`.

    m = convc.load("examples/seed.cell")
    params = m.init_params(seed=0)
    convc.save_params(params, "seed.safetensors", m)
    params = convc.load_params("seed.safetensors", m)

The file is the safetensors format (a JSON header and the raw little-endian
bytes of each tensor; any safetensors reader in PyTorch, JAX, NumPy or Rust
opens it). Its tensors are named and shaped exactly as `MODEL["params"]`;
its header's metadata holds (every value a string, as the format requires):

    convc.format          "params"
    convc.format_version  "1"
    convc.model           the model's name
    convc.fingerprint     sha256 of the model's interface (`model_fingerprint`)
    convc.interface       that interface as JSON, so a mismatch can be explained
    convc.version         the convc that wrote it
    anything given as `metadata=` (keys not starting with "convc.")

Loading checks, in this order, and refuses with a `WeightsError` (a
ConvcError) that names the file and the first tensor or field that is wrong:
the file is a safetensors file; every tensor of the model is there and no
other; each has the model's shape and a float dtype (float32 or float64, one
for all, or the `dtype=` asked for); the fingerprint is the model's; every
value is finite (unless `allow_nonfinite`). Reading never runs code: the
format holds only a JSON header and numbers, and a file that is anything else
fails to parse.

Writing is atomic (`convc.runtime.atomic`): the bytes go to a temporary file
beside the target, are fsync-ed, and appear under the target name in one
step. An existing file is never replaced unless `overwrite=True`; without it
the new file is linked into place, which fails if a file of that name
appeared meanwhile.

safetensors is an optional dependency (`pip install 'convc[safetensors]'`);
without it these functions raise a WeightsError that says so.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from convc.errors import ConvcError

FORMAT = "params"
FORMAT_VERSION = "1"
PREFIX = "convc."
INSTALL_HINT = "pip install 'convc[safetensors]' (or pip install safetensors)"
FLOAT_DTYPES = ("float32", "float64")


class WeightsError(ConvcError):
    """A weights file that cannot be written, read, or used for this model."""


def require_safetensors():
    """The safetensors package, or a WeightsError that says how to install it."""
    try:
        import safetensors
        import safetensors.numpy
    except ImportError:
        raise WeightsError("reading and writing .safetensors files needs the safetensors "
                           f"package, which is not installed: {INSTALL_HINT}") from None
    return safetensors


# ---------------------------------------------------------------------------
# Which model a file is for
# ---------------------------------------------------------------------------


def model_table(model_or_spec: Any) -> dict:
    """The MODEL table of a compiled module, a MODEL dict itself, or a `.cell` file's
    last model (compiled in memory)."""
    if isinstance(model_or_spec, dict) and "params" in model_or_spec:
        return model_or_spec
    table = getattr(model_or_spec, "MODEL", None)
    if isinstance(table, dict):
        return table
    if isinstance(model_or_spec, (str, os.PathLike)):
        from convc.runtime.loader import load

        return load(model_or_spec).MODEL
    raise TypeError(f"expected a compiled model (convc.load), its MODEL table or a .cell "
                    f"path, got {type(model_or_spec).__name__}")


def _shape(value) -> list[int]:
    return [int(n) for n in value]


def model_interface(model_or_spec: Any) -> dict:
    """What a weights file's fingerprint covers: the model's name, its parameters
    (names, shapes, kinds), states (names, shapes), inputs and outputs (shapes) and
    which cell each instance is. The equations are not part of it: a spec that
    computes something else with the same parameters, states, inputs, outputs and
    cells has the same fingerprint; editing comments or the train block keeps it."""
    m = model_table(model_or_spec)
    return {
        "model": m["name"],
        "params": {k: [_shape(v["shape"]), v.get("kind")] for k, v in sorted(m["params"].items())},
        "states": {k: _shape(v["shape"]) for k, v in sorted(m.get("states", {}).items())},
        "inputs": {k: _shape(v) for k, v in sorted(m.get("inputs", {}).items())},
        "outputs": {k: _shape(v) for k, v in sorted(m.get("outputs", {}).items())},
        "cells": dict(sorted(m.get("cells", {}).items())),
    }


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def model_fingerprint(model_or_spec: Any) -> str:
    """sha256 (hex) of `model_interface` as canonical JSON."""
    return hashlib.sha256(_canonical(model_interface(model_or_spec)).encode()).hexdigest()


def _convc_version() -> str:
    from convc import __version__

    return __version__


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _host(value: Any) -> np.ndarray:
    """One parameter as a contiguous NumPy array (CuPy arrays are copied to the host);
    its dtype is checked with the rest (`_check_against_model`)."""
    if hasattr(value, "get") and not isinstance(value, np.ndarray) and hasattr(value, "shape"):
        value = value.get()  # CuPy
    return np.ascontiguousarray(np.asarray(value))


def _check_against_model(where: str, tensors: dict[str, Any], m: dict,
                         dtype: str | None = None) -> None:
    """Raise WeightsError naming the first tensor (in sorted order) that the model has
    not, lacks, has with another shape, or has in a dtype other than float32/float64
    (all alike, or `dtype`)."""
    specs = m["params"]
    for name in sorted(set(specs) | set(tensors)):
        if name not in tensors:
            raise WeightsError(f"{where}: tensor {name} is missing (model {m['name']} has a "
                               f"parameter {name} of shape {tuple(specs[name]['shape'])})")
        if name not in specs:
            raise WeightsError(f"{where}: tensor {name} is not a parameter of model "
                               f"{m['name']} (it has {', '.join(sorted(specs))})")
    first = None
    for name in sorted(specs):
        value = tensors[name]
        got, need = tuple(value.shape), tuple(specs[name]["shape"])
        if got != need:
            raise WeightsError(f"{where}: tensor {name} has shape {got}, model {m['name']} "
                               f"needs {need}")
        kind = np.dtype(value.dtype).name
        if kind not in FLOAT_DTYPES:
            raise WeightsError(f"{where}: tensor {name} has dtype {kind}; parameters are "
                               f"{' or '.join(FLOAT_DTYPES)}")
        if dtype is not None and kind != dtype:
            raise WeightsError(f"{where}: tensor {name} has dtype {kind}, {dtype} was asked "
                               f"for (convert after loading: v.astype({dtype!r}))")
        if first is None:
            first = (name, kind)
        elif kind != first[1]:
            raise WeightsError(f"{where}: tensor {name} has dtype {kind} but {first[0]} has "
                               f"{first[1]}; a weights file holds one dtype")


def _check_finite(where: str, tensors: dict[str, np.ndarray]) -> None:
    for name in sorted(tensors):
        bad = int(np.count_nonzero(~np.isfinite(tensors[name])))
        if bad:
            raise WeightsError(f"{where}: tensor {name} has {bad} non-finite "
                               f"value{'s' if bad != 1 else ''} (NaN or Inf); refusing to use "
                               f"it (allow_nonfinite=True loads it anyway)")


def metadata_for(model_or_spec: Any, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The header metadata `save_params` writes for a model (see the module docstring)."""
    meta = {}
    for key, value in sorted((extra or {}).items()):
        if not isinstance(key, str) or not isinstance(value, str):
            raise WeightsError(f"metadata must map strings to strings (safetensors stores "
                               f"only text there); got {key!r}: {type(value).__name__}")
        if key.startswith(PREFIX):
            raise WeightsError(f"metadata key {key!r}: keys starting with {PREFIX!r} are "
                               f"convc's own")
        meta[key] = value
    interface = model_interface(model_or_spec)
    meta.update({
        PREFIX + "format": FORMAT,
        PREFIX + "format_version": FORMAT_VERSION,
        PREFIX + "model": interface["model"],
        PREFIX + "fingerprint": model_fingerprint(model_or_spec),
        PREFIX + "interface": _canonical(interface),
        PREFIX + "version": _convc_version(),
    })
    return meta


def _write_new(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then link it into
    place: the link fails if `path` exists, so nothing is ever replaced."""
    from convc.runtime.atomic import fsync_folder, temporary_path

    temp = temporary_path(path)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, path)
        except FileExistsError:
            raise
        except OSError:
            # a file system without hard links: the check and the rename are two steps
            if os.path.lexists(path):
                raise FileExistsError(path) from None
            os.replace(temp, path)
    finally:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
    fsync_folder(path.parent)


def save_params(params: dict, path: str | os.PathLike, model: Any, *,
                metadata: dict[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write `params` (NumPy or CuPy arrays, float32 or float64) to `path` as a
    .safetensors file for `model` (a compiled module, its MODEL table or a .cell path).

    The names and shapes must be exactly the model's (else a WeightsError naming
    the first wrong tensor), all in one dtype; `metadata` (str -> str) is stored
    in the header beside convc's own keys. An existing file is refused unless
    `overwrite`, and a .cell file never; the write is atomic either way.
    Returns the path written.
    """
    st = require_safetensors()
    m = model_table(model)
    path = Path(path)
    tensors = {name: _host(params[name]) for name in sorted(params)}
    _check_against_model("parameters to save", tensors, m)
    meta = metadata_for(m, metadata)
    data = st.numpy.save(tensors, metadata=meta)

    from convc.runtime.atomic import check_output, write_atomic

    check_output(path)
    if not overwrite and os.path.lexists(path):
        raise WeightsError(f"refusing to replace {path}: it exists (pass overwrite=True, or "
                           f"--overwrite to convc export, to replace it)")
    try:
        if path.parent != Path(""):
            path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            write_atomic(path, data)
        else:
            _write_new(path, data)
    except FileExistsError:
        raise WeightsError(f"refusing to replace {path}: it appeared while it was being "
                           f"written (pass overwrite=True to replace it)") from None
    except OSError as exc:
        raise WeightsError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def read_weights(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of any .safetensors file, unchecked against a model.

    Raises WeightsError for a file that is missing, unreadable or not in the
    safetensors format (nothing in it is ever executed)."""
    st = require_safetensors()
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: {'is a folder' if path.is_dir() else 'not found'}")
    try:
        with st.safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except Exception as exc:  # SafetensorError: a header that is not safetensors JSON
        reason = str(exc).strip() or type(exc).__name__
        raise WeightsError(f"{path}: not a readable .safetensors file ({reason})") from None
    return dict(sorted(tensors.items())), dict(metadata)


def _explain_fingerprint(where: str, meta: dict[str, str], m: dict) -> str:
    """The first field of the interface in which the file's model differs from `m`."""
    mine = model_interface(m)
    try:
        theirs = json.loads(meta.get(PREFIX + "interface", ""))
    except ValueError:
        theirs = None
    if isinstance(theirs, dict):
        for key in mine:
            if theirs.get(key) != mine[key]:
                sub = theirs.get(key)
                if isinstance(sub, dict) and isinstance(mine[key], dict):
                    for name in sorted(set(sub) | set(mine[key])):
                        if sub.get(name) != mine[key].get(name):
                            return (f"{where} was written for another model: its {key} "
                                    f"{name} is {sub.get(name)!r}, here {mine[key].get(name)!r}")
                return (f"{where} was written for another model: its {key} is {sub!r}, "
                        f"here {mine[key]!r}")
    return (f"{where}: fingerprint {meta.get(PREFIX + 'fingerprint', '')[:12]}... is not "
            f"model {m['name']}'s ({model_fingerprint(m)[:12]}...)")


def check_metadata(where: str, meta: dict[str, str], m: dict) -> None:
    """Refuse a file that does not say it is convc parameters of model `m`."""
    if meta.get(PREFIX + "format") != FORMAT:
        raise WeightsError(f"{where}: no convc metadata (convc.format is "
                           f"{meta.get(PREFIX + 'format')!r}, not {FORMAT!r}); a file from "
                           f"elsewhere loads with check_fingerprint=False, or map its names "
                           f"with convc.runtime.layouts")
    if meta.get(PREFIX + "format_version") != FORMAT_VERSION:
        raise WeightsError(f"{where}: weights format version "
                           f"{meta.get(PREFIX + 'format_version')!r}; this convc reads "
                           f"version {FORMAT_VERSION}")
    if meta.get(PREFIX + "fingerprint") != model_fingerprint(m):
        raise WeightsError(_explain_fingerprint(where, meta, m))


def load_params(path: str | os.PathLike, model_or_spec: Any, *, dtype: str | None = None,
                check_fingerprint: bool = True, allow_nonfinite: bool = False) -> dict:
    """The parameters in the .safetensors file `path`, checked against a model (a
    compiled module, its MODEL table or a .cell path): {name: NumPy array}.

    Refused with a WeightsError naming the first wrong tensor: one missing or
    extra, of another shape, not float32/float64, in a dtype other than
    `dtype` (when given), or holding NaN/Inf (unless `allow_nonfinite`); and a
    file whose fingerprint is not the model's (unless `check_fingerprint=False`,
    which also accepts files without convc metadata, such as a safetensors
    file written by other code with convc's names).
    """
    m = model_table(model_or_spec)
    where = str(path)
    tensors, meta = read_weights(path)
    if dtype is not None:
        dtype = np.dtype(dtype).name
        if dtype not in FLOAT_DTYPES:
            raise WeightsError(f"dtype {dtype}: parameters are {' or '.join(FLOAT_DTYPES)}")
    try:
        _check_against_model(where, tensors, m, dtype)
    except WeightsError as exc:
        written_for = meta.get(PREFIX + "model")
        if written_for is not None and written_for != m["name"]:
            raise WeightsError(f"{exc} (the file was written for model {written_for!r})"
                               ) from None
        raise
    if check_fingerprint:
        check_metadata(where, meta, m)
    if not allow_nonfinite:
        _check_finite(where, tensors)
    return {name: np.array(tensors[name]) for name in sorted(tensors)}
