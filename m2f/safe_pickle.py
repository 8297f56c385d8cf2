"""Loading pickles without running their code: an allow-list of the globals weight files need.

A pickle names functions to call while loading (`__reduce__`); a file from the internet can name
`os.system`. m2f therefore never unpickles with the plain `pickle` module or `torch.load(weights_only=False)`:

- the original's `model_final_*.pkl` (a pickle of `{"model": {name: numpy array}, "__author__": ...}`)
  is read by `load_pickle`, whose unpickler resolves only `ALLOWED_GLOBALS`: numpy's array and dtype
  reconstruction (`_reconstruct`, `scalar`, `_frombuffer`), `collections.OrderedDict`, builtin containers and value types, and `_codecs.encode` (how Python 3 pickles
  bytes at protocol 2); any other global stops the load with an `UnsafePickleError` naming it and the file;
- checkpoints (`torch.load`) are read with `weights_only=True`, which allows tensors and builtin
  containers, plus the numpy globals of `NUMPY_GLOBALS` so that checkpoints written before m2f stored its
  numpy RNG state as a tensor still load (see `m2f.checkpoint.load`).

Every allowed global only builds data: arrays, dtypes, dicts, lists, tuples, sets and bytes.
"""

import _codecs
import collections
import pickle
from pathlib import Path
from typing import Any

import numpy as np

_NUMPY_CORE = np._core if hasattr(np, "_core") else np.core  # numpy 2 / 1

# numpy 2's per-dtype classes (numpy.dtypes.Float32DType, ...), which some dtype pickles name.
_DTYPE_CLASSES = sorted({type(np.dtype(t)) for t in (np.bool_, np.uint8, np.int8, np.uint16, np.int16, np.uint32,
                                                     np.int32, np.uint64, np.int64, np.float16, np.float32,
                                                     np.float64)}, key=lambda t: t.__name__)
# The objects numpy arrays, numpy scalars and dtypes pickle to (numpy 1.x and 2.x write the same ones).
# Protocol 5 pickles arrays with numeric._frombuffer (from an out-of-band or inline buffer).
_NUMPY_FUNCTIONS = (_NUMPY_CORE.multiarray._reconstruct, _NUMPY_CORE.multiarray.scalar, _NUMPY_CORE.numeric._frombuffer)
NUMPY_GLOBALS: list[Any] = [*_NUMPY_FUNCTIONS, np.ndarray, np.dtype, *_DTYPE_CLASSES]
_BUILTIN_CONTAINERS = (dict, list, tuple, set, frozenset, bytes, bytearray, str, int, float, bool, complex)

# (module, name) -> object. numpy 2 pickles name "numpy._core.multiarray", numpy 1 "numpy.core.multiarray".
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(f"numpy.{core}.{obj.__module__.rsplit('.', 1)[-1]}", obj.__name__): obj for core in ("core", "_core")
       for obj in _NUMPY_FUNCTIONS},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(t.__module__, t.__name__): t for t in _DTYPE_CLASSES},
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _codecs.encode,
    **{(module, t.__name__): t for t in _BUILTIN_CONTAINERS for module in ("builtins", "__builtin__")},  # Py 3 / 2
}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle refers to a global outside `ALLOWED_GLOBALS`; nothing of it was executed."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, *, source: Path):
        super().__init__(file, encoding="latin1")  # Python 2 era detectron2 pickles store str as bytes
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.source} refers to {module}.{name}, which a weight file never needs; m2f refuses to "
                f"load it (unpickling could run code). Only numpy arrays, OrderedDict and builtin containers "
                f"are allowed; if this is a file you made yourself, re-save its weights as plain arrays."
            ) from None


def load_pickle(path: str | Path) -> Any:
    """Unpickles `path` allowing only `ALLOWED_GLOBALS`.

    Raises:
        UnsafePickleError: the file names any other global (the error names it and the file).
        pickle.UnpicklingError, EOFError, ...: the file is not a (complete) pickle.
    """
    path = Path(path)
    with open(path, "rb") as f:
        return _RestrictedUnpickler(f, source=path).load()
