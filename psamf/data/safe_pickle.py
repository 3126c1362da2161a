"""The one restricted unpickler every pickle psamf reads goes through.

`pickle.load` runs whatever callables a file names (os.system, builtins.eval, importlib...), so
psamf never calls it on input. `restricted_load(path, allowed)` resolves a global only if
`(module, name)` is in `allowed`, and refuses anything else *by name* in `find_class`, which the
unpickler calls before it can call what it found: nothing a refused pickle names ever runs.

Two allow-lists, one per kind of file:

FI_GLOBALS (ChaLearn First Impressions, Python 2 protocol-2 pickles): exactly
    numpy.core.multiarray.scalar   numeric dtypes only (see `_plain_scalar`)
    numpy.dtype

ARRAY_GLOBALS (MMSA and MulT feature pickles, psamf.data.pickles): numpy arrays, dtypes and
scalars through numpy's own reconstruct functions, under numpy 1.x and 2.x module names:
    numpy.core.multiarray._reconstruct / numpy._core.multiarray._reconstruct
        protocols 2-4 arrays; the subtype must be numpy.ndarray itself
    numpy.ndarray                  only as that subtype argument
    numpy.core.numeric._frombuffer / numpy._core.numeric._frombuffer
        protocol-5 arrays (in-band buffers only; out-of-band buffers are refused)
    numpy.dtype
    numpy.core.multiarray.scalar / numpy._core.multiarray.scalar
        numeric dtypes only
    _codecs.encode                 only (str, 'latin1') -> bytes: how a Python 3 protocol-2
                                   pickle spells a bytes object
Plain containers (dict, list, tuple, set, str, bytes, int, float, bool, None) need no global.

Arrays: the dtype must be a number, bool, fixed-width bytes/str or object (the object items are
themselves unpickled through this same unpickler, so they are only the things listed here);
structured, void, datetime and subarray dtypes are refused. Every array's declared size
(shape x itemsize) counts against `max_bytes` *before* numpy allocates it, like data.max_csd_mb
for a .csd; the file itself must also fit under `max_bytes`.

Any refusal, truncation or corruption is one InputError naming the file.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np

from psamf.errors import InputError


def _numpy_attr(name: str, *modules: str) -> Any:
    import importlib

    for mod in modules:
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {name} in {modules}")


_SCALAR = _numpy_attr("scalar", "numpy._core.multiarray", "numpy.core.multiarray")
_RECONSTRUCT = _numpy_attr("_reconstruct", "numpy._core.multiarray", "numpy.core.multiarray")

DEFAULT_MAX_BYTES = 16 << 30
ARRAY_KINDS = "biufcSUO"      # numbers, bool, bytes, str, object (items unpickled under the same rules)
SCALAR_KINDS = "biufc"

Resolver = Callable[["RestrictedUnpickler"], Any]


class _CappedArray(np.ndarray):
    """What `_reconstruct` builds while unpickling: its __setstate__ checks the declared dtype
    and shape against the budget before numpy allocates. Turned back into plain ndarrays
    (`_plain`) before restricted_load returns."""

    _owner: "RestrictedUnpickler | None" = None

    def __setstate__(self, state: Any) -> None:
        owner = type(self)._owner
        if owner is None or not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("malformed ndarray state")
        shape, dtype = (state[1], state[2]) if len(state) == 5 else (state[0], state[1])
        owner.charge(shape, dtype)
        super().__setstate__(state)


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals in `allowed` ({(module, name): resolver(unpickler)})."""

    def __init__(self, file: Any, path: Path, allowed: dict[tuple[str, str], Resolver],
                 max_bytes: int = DEFAULT_MAX_BYTES):
        super().__init__(file, encoding="latin1")
        self._path = path
        self._allowed = allowed
        self._budget = max_bytes
        self._max_bytes = max_bytes
        # One subclass per load, so concurrent loads never share a budget.
        self.array_type = type("_CappedArray", (_CappedArray,), {"_owner": self})

    def find_class(self, module: str, name: str) -> Any:
        resolver = self._allowed.get((module, name))
        if resolver is None:
            raise InputError(self._path, f"pickle references forbidden global {module}.{name} "
                                         "(refused before anything ran)")
        return resolver(self)

    def persistent_load(self, pid: Any) -> Any:
        raise InputError(self._path, "pickle uses a persistent id, which is not allowed")

    # ---- what the allowed globals resolve to --------------------------------------------

    def charge(self, shape: Any, dtype: Any) -> None:
        """Check an array's declared dtype and shape; count its size against the budget."""
        if not isinstance(dtype, np.dtype):
            raise InputError(self._path, f"pickle declares an array with dtype {dtype!r}, not a numpy dtype")
        if dtype.kind not in ARRAY_KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise InputError(self._path, f"pickle declares an array of dtype {dtype!r} (allowed: numbers, "
                                         "bool, bytes, str, object)")
        if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise InputError(self._path, f"pickle declares an array of shape {shape!r}")
        size = float(np.prod([float(n) for n in shape])) * max(dtype.itemsize, 1)
        self._budget -= size
        if self._budget < 0:
            raise InputError(self._path, f"pickle declares an array of shape {shape} {dtype}: over the cap of "
                                         f"{self._max_bytes >> 20} MiB one file may hold (data.max_pickle_mb)")

    def plain_scalar(self, dtype: Any, *args: Any) -> Any:
        # numpy's scalar() also builds object / structured scalars from raw bytes; only numbers pass.
        if not isinstance(dtype, np.dtype) or dtype.kind not in SCALAR_KINDS or dtype.fields is not None \
                or dtype.subdtype is not None or dtype.hasobject:
            raise InputError(self._path, f"pickle builds a numpy scalar of non-numeric dtype {dtype!r}")
        return _SCALAR(dtype, *args)

    def reconstruct(self, subtype: Any, shape: Any, dtype: Any) -> Any:
        if subtype is not np.ndarray:
            raise InputError(self._path, f"pickle reconstructs an array of type {subtype!r}, not numpy.ndarray")
        return _RECONSTRUCT(self.array_type, shape, dtype)

    def frombuffer(self, buf: Any, dtype: Any, shape: Any, order: Any) -> Any:
        if isinstance(buf, pickle.PickleBuffer):
            buf = buf.raw()
        if not isinstance(buf, (bytes, bytearray, memoryview)):
            raise InputError(self._path, f"pickle gives an array buffer of type {type(buf).__name__}")
        if isinstance(dtype, np.dtype) and dtype.hasobject:
            raise InputError(self._path, "pickle declares an object array from raw bytes")
        self.charge(tuple(shape) if isinstance(shape, (tuple, list)) else shape, dtype)
        if order not in ("C", "F"):
            raise InputError(self._path, f"pickle declares array order {order!r}")
        arr = np.frombuffer(buf, dtype=dtype)
        return arr.reshape(shape, order=order)

    def latin1_encode(self, obj: Any, encoding: Any = "utf-8", *rest: Any) -> bytes:
        if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or rest:
            raise InputError(self._path, "pickle calls _codecs.encode other than (str, 'latin1')")
        return obj.encode("latin-1")


def _fixed(obj: Any) -> Resolver:
    return lambda u: obj


FI_GLOBALS: dict[tuple[str, str], Resolver] = {
    ("numpy.core.multiarray", "scalar"): lambda u: u.plain_scalar,
    ("numpy", "dtype"): _fixed(np.dtype),
}

ARRAY_GLOBALS: dict[tuple[str, str], Resolver] = {
    **{(m, "_reconstruct"): (lambda u: u.reconstruct) for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): (lambda u: u.plain_scalar) for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): (lambda u: u.frombuffer) for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): _fixed(np.ndarray),
    ("numpy", "dtype"): _fixed(np.dtype),
    ("_codecs", "encode"): lambda u: u.latin1_encode,
}


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _plain(obj: Any) -> Any:
    """Replace the budget-checking array subclass by plain ndarrays, in place where possible."""
    if isinstance(obj, _CappedArray):
        arr = obj.view(np.ndarray)
        if arr.dtype.kind == "O":
            flat = arr.reshape(-1)
            for i, item in enumerate(flat):
                flat[i] = _plain(item)
        return arr
    if isinstance(obj, dict):
        for k in list(obj):
            obj[k] = _plain(obj[k])
        return obj
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            obj[i] = _plain(item)
        return obj
    if isinstance(obj, tuple):
        return tuple(_plain(x) for x in obj)
    return obj


def restricted_load(path: str | Path, allowed: dict[tuple[str, str], Resolver] = FI_GLOBALS,
                    max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """Unpickle `path` admitting only `allowed` (see the module docstring); any problem -> one InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        size = path.stat().st_size
        if size == 0:
            raise InputError(path, "empty file, not a pickle")
        if size > max_bytes:
            raise InputError(path, f"{size >> 20} MiB: over the cap of {max_bytes >> 20} MiB one file may hold "
                                   "(data.max_pickle_mb)")
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, path, allowed, max_bytes).load()
    except InputError:
        raise
    except OSError as e:
        raise InputError(path, f"unreadable ({_one_line(e)})") from None
    except RecursionError:
        raise InputError(path, "corrupt pickle (nesting too deep)") from None
    except Exception as e:  # noqa: BLE001 - every unpickling failure is bad input
        kind = "truncated pickle" if isinstance(e, EOFError) or "truncated" in str(e) else \
            "corrupt or truncated pickle"
        raise InputError(path, f"{kind} ({_one_line(e)})") from None
    return _plain(obj)
