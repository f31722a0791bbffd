"""Reading and writing PyTorch ``torch.save`` files (the zip format) without trusting their pickle.

A ``torch.save`` file is a zip archive: ``<prefix>/data.pkl`` (a pickle whose tensors point, through
"persistent ids", at raw storages) and ``<prefix>/data/<key>`` (each storage's little-endian bytes).
A pickle can name any importable callable and call it (``os.system`` included), so :func:`load` reads
it with :class:`RestrictedUnpickler`: every global the pickle names is looked up in a closed table
(:data:`ALLOWED_GLOBALS`) of this module's own stand-ins (tensors become numpy arrays, the reference's
and PEFT's data classes become attribute records, enums their values) and anything else is refused
before it is called. Nothing the pickle names is imported, so reading needs neither torch nor the
reference's code.

Writing (:func:`save`) goes through ``torch.save`` itself, so the reference's ``torch.load`` reads it.
"""

from __future__ import annotations

import collections
import io
import pickle
import sys
import types
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import ml_dtypes
import numpy as np


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint's pickle names a global outside the allow-list (it could run code); nothing was called."""


class TorchCheckpointError(ValueError):
    """A file is not a readable ``torch.save`` zip archive, or its tensors do not fit their storages."""


class Record:
    """A data-class instance from a pickle, as plain attributes (no code of the original class runs)."""

    qualified_name = "Record"

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ values)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise TorchCheckpointError(f"{self.qualified_name}: unexpected pickled state of type {type(state).__name__}")
        self.__dict__.update(state)

    def __repr__(self):
        return f"{self.qualified_name}({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"


def _record_class(qualified_name: str) -> type:
    return type(qualified_name.rsplit(".", 1)[1], (Record,), {"qualified_name": qualified_name})


def _enum_value(value):
    """An enum member as its value (``str``/``int`` enums only)."""
    if not isinstance(value, (str, int)):
        raise TorchCheckpointError(f"an enum value must be a str or int, got {type(value).__name__}")
    return value


class _StorageType:
    def __init__(self, name: str, dtype):
        self.name, self.dtype = name, np.dtype(dtype)


_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _Storage:
    def __init__(self, data: np.ndarray, location: str):
        self.data, self.location = data, location


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """``torch._utils._rebuild_tensor_v2`` as a numpy copy of the viewed elements."""
    del requires_grad, backward_hooks, metadata
    if not isinstance(storage, _Storage):
        raise TorchCheckpointError(f"a tensor's storage must come from the archive, got {type(storage).__name__}")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in (*size, *stride)) or storage_offset < 0:
        raise TorchCheckpointError(f"tensor view size={size} stride={stride} offset={storage_offset} is invalid")
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else storage_offset - 1
    if last >= storage.data.size:
        raise TorchCheckpointError(f"tensor view size={size} stride={stride} offset={storage_offset} exceeds its storage of {storage.data.size} elements")
    item = storage.data.itemsize
    view = np.lib.stride_tricks.as_strided(storage.data[storage_offset:], size, tuple(s * item for s in stride), writeable=False)
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    del requires_grad, backward_hooks
    if not isinstance(data, np.ndarray):
        raise TorchCheckpointError(f"a parameter must wrap a tensor, got {type(data).__name__}")
    return data


# Data classes whose pickled instances a reference checkpoint holds (reference-facts §9).
RECORD_CLASSES = (
    "ctx_to_lora.modeling.hypernet.HypernetConfig",
    "ctx_to_lora.modeling.aggregator.AggregatorConfig",
    "ctx_to_lora.configs.CtxEncoderArguments",
    "peft.tuners.lora.config.LoraConfig",
    "peft.tuners.lora.config.LoraRuntimeConfig",
    "peft.tuners.lora.config.LoftQConfig",
    "peft.tuners.lora.config.EvaConfig",
    "peft.tuners.lora.config.CordaConfig",
)
ENUM_CLASSES = (
    "ctx_to_lora.modeling.aggregator.AGGREGATOR_TYPE",
    "ctx_to_lora.modeling.ctx_encoder.CTX_ENCODER_TYPE",
    "ctx_to_lora.pooling.POOL_FN",
    "peft.utils.peft_types.PeftType",
    "peft.utils.peft_types.TaskType",
)

# (module, name) -> this module's stand-in. The closed list of what a pickle may name.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,  # protocol-2 pickles spell builtins the Python 2 way
    ("__builtin__", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
    **{tuple(name.rsplit(".", 1)): _record_class(name) for name in RECORD_CLASSES},
    **{tuple(name.rsplit(".", 1)): _enum_value for name in ENUM_CLASSES},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a torch zip archive, resolving globals only through :data:`ALLOWED_GLOBALS`.

    Raises UnsafeCheckpointError naming the first global outside the list (``posix.system``,
    ``builtins.eval``, an unknown class) before anything is called.
    """

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str):
        super().__init__(file)
        self._archive, self._prefix, self._source = archive, prefix, source
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise UnsafeCheckpointError(
                f"{self._source}: refused to load the global {module}.{name}: a checkpoint may name only tensors and "
                f"the data classes {', '.join(RECORD_CLASSES[:3])} (and PEFT's LoRA config); nothing was executed"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise TorchCheckpointError(f"{self._source}: unsupported persistent id {pid!r:.200}")
        _, storage_type, key, location, numel = pid
        key = str(key)
        if key not in self._storages:
            entry = f"{self._prefix}data/{key}"
            try:
                raw = self._archive.read(entry)
            except KeyError:
                raise TorchCheckpointError(f"{self._source}: storage {entry} is missing from the archive") from None
            if len(raw) != numel * storage_type.dtype.itemsize:
                raise TorchCheckpointError(f"{self._source}: storage {entry} holds {len(raw)} bytes, expected {numel} x {storage_type.name}")
            self._storages[key] = _Storage(np.frombuffer(raw, storage_type.dtype.newbyteorder("<")).astype(storage_type.dtype), str(location))
        return self._storages[key]


def load(path: str | Path) -> Any:
    """The object a ``torch.save`` zip archive holds, tensors as numpy arrays (read with :class:`RestrictedUnpickler`).

    Raises FileNotFoundError for a missing file, TorchCheckpointError for a file that is not a torch zip
    archive (legacy non-zip ``torch.save`` files are not read) or whose storages are inconsistent, and
    UnsafeCheckpointError for a pickle that names a global outside :data:`ALLOWED_GLOBALS`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if not zipfile.is_zipfile(path):
        raise TorchCheckpointError(f"{path} is not a torch.save zip archive (legacy and plain pickle files are refused)")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise TorchCheckpointError(f"{path}: expected one <prefix>/data.pkl in the archive, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise TorchCheckpointError(f"{path}: big-endian archives are not supported")
        unpickler = RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), archive, prefix, str(path))
        try:
            return unpickler.load()
        except (UnsafeCheckpointError, TorchCheckpointError):
            raise
        except Exception as error:  # a malformed pickle: EOF, bad opcode, wrong argument types
            raise TorchCheckpointError(f"{path}: its pickle cannot be read ({type(error).__name__}: {error})") from error


@contextmanager
def importable(qualified_names: Iterator[str] | tuple[str, ...]):
    """Makes each ``module.Class`` name importable while pickling: a module not already loaded gets an empty
    stand-in module (removed again afterwards) holding a stand-in class with that path, so ``pickle``
    writes the name the reader's real class has. Yields ``{qualified name: class}`` (the loaded module's
    class where one exists)."""
    added: list[str] = []
    classes = {}
    try:
        for qualified in qualified_names:
            module_name, class_name = qualified.rsplit(".", 1)
            parts = module_name.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name not in sys.modules:
                    sys.modules[name] = types.ModuleType(name)
                    added.append(name)
            module = sys.modules[module_name]
            if not hasattr(module, class_name):
                setattr(module, class_name, type(class_name, (), {"__module__": module_name, "__qualname__": class_name}))
            classes[qualified] = getattr(module, class_name)
        yield classes
    finally:
        for name in reversed(added):
            sys.modules.pop(name, None)


def instance(cls: type, fields: dict[str, Any]):
    """An instance of ``cls`` holding ``fields`` as attributes, without running its ``__init__``."""
    obj = cls.__new__(cls)
    obj.__dict__.update(fields)
    return obj


def save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)`` (zip format), written to a temporary name and renamed into place."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(obj, temporary)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
