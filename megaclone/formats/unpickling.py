"""Reading a checkpoint never runs code from it.

A pickle may name any importable callable, and unpickling calls it: a shared checkpoint could run a
shell command the moment it is read. Megatron checkpoints are pickles in four places (legacy files,
``common.pt``, torch DCP's ``.metadata`` and its ``ShardedObject`` bytes), and each is read here through an allowlist of what Megatron-LM and megaclone store (tensors, containers, the args
``Namespace``, megatron-core's enums, RNG states with their numpy arrays and scalars):

- ``torch.load`` (legacy ``model_optim_rng.pt``, ``common.pt``, and torch DCP's ``ShardedObject``
  bytes such as ``rng_state``) runs torch's weights-only unpickler. torch DCP asks for
  ``weights_only=False`` when it loads a ``ShardedObject``, so :func:`guard` makes every ``torch.load``
  of the process weights-only;
- torch DCP's ``.metadata`` is a plain ``pickle``; :func:`guard` has torch DCP read it with an
  unpickler that admits only torch DCP's own metadata classes, ``torch.Size`` and dtypes.

:func:`guard` runs when megaclone's checkpoint I/O is imported (megatron-core likewise registers its
safe globals on import). :func:`trust_checkpoint_code` (``--trust-checkpoint-code``) lifts both for a
trusted checkpoint that holds other pickled objects. An object outside the allowlist is refused before
it is built, with a :class:`~megaclone.errors.MegacloneError` naming the file and the global.
This module imports no torch at module level: the tools set the trust flag while parsing flags.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import sys
import types
from typing import Any, Optional

_trusted = False
_torch_load = None  # torch's own torch.load, once guard() has replaced it

# torch DCP's .metadata: its dataclasses and enums, and the torch values they hold (besides these,
# only torch's dtypes, layouts and memory formats)
_DCP = "torch.distributed.checkpoint."
_METADATA_GLOBALS = {
    *((_DCP + "metadata", n) for n in ("Metadata", "StorageMeta", "TensorStorageMetadata", "ChunkStorageMetadata",
                                       "TensorProperties", "BytesStorageMetadata", "MetadataIndex",
                                       "_MEM_FORMAT_ENCODING")),
    *((_DCP + "planner", n) for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
    (_DCP + "filesystem", "_StorageInfo"),
    # megatron-core 0.14 stores its SavePlan subclass (a dataclass) in the metadata's planner data
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
}

# torch's weights-only unpickler words it either way, depending on the global; ours as the first
REFUSED = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")


def trust_checkpoint_code(trust: bool = True) -> None:
    """Read checkpoints with full unpickling (only for a trusted file holding other pickled objects)."""
    global _trusted
    _trusted = trust


def _allowed_globals() -> list:
    """What Megatron-LM and megaclone pickle besides tensors and containers (megatron-core adds its
    enums and config classes itself when it is imported)."""
    import argparse
    import pathlib
    import signal

    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    dtype_classes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")] \
        if hasattr(np, "dtypes") else []
    allowed: list = [argparse.Namespace, types.SimpleNamespace, pathlib.PosixPath, io.BytesIO, signal.Signals,
                     np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar, *dtype_classes]
    # numpy 1 pickles name numpy.core; numpy 2 resolves both
    allowed += [(multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
                (multiarray.scalar, "numpy.core.multiarray.scalar")]
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles torch DCP's ``.metadata``: torch DCP's classes, torch.Size, dtypes; nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                          torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name} is not torch DCP metadata")


class _GuardedPickle(types.ModuleType):
    """The ``pickle`` module as torch DCP's filesystem reader sees it: ``load`` checks every global."""

    def __init__(self) -> None:
        super().__init__("pickle")

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)

    @staticmethod
    def load(file, **kwargs) -> Any:
        return pickle.load(file, **kwargs) if _trusted else _MetadataUnpickler(file, **kwargs).load()

    @staticmethod
    def loads(data: bytes, **kwargs) -> Any:
        return pickle.loads(data, **kwargs) if _trusted else _MetadataUnpickler(io.BytesIO(data), **kwargs).load()


def _weights_only_load(f, *args, weights_only: Optional[bool] = None, **kwargs) -> Any:
    """``torch.load``, weights-only whatever the caller asked, unless checkpoints are trusted."""
    return _torch_load(f, *args, weights_only=weights_only if _trusted else True, **kwargs)


def guard() -> None:
    """Make this process read checkpoints without running code from them (idempotent)."""
    global _torch_load
    import torch
    import torch.distributed.checkpoint.filesystem as dcp_filesystem

    if _torch_load is None:
        torch.serialization.add_safe_globals(_allowed_globals())
        _torch_load = torch.load
        torch.load = _weights_only_load
    dcp_filesystem.pickle = _GuardedPickle()


def load(path: "str | os.PathLike", **kwargs) -> Any:
    """``torch.load`` of one checkpoint file on the CPU, weights-only unless trusted. Megatron-LM's
    args may hold megatron-core's enums, which importing megatron-core registers as safe: it is
    imported (seconds) only when the file names one of its globals."""
    guard()
    try:
        return _torch_load(path, map_location="cpu", weights_only=not _trusted, **kwargs)
    except pickle.UnpicklingError as exc:
        if "megatron" not in str(exc) or "megatron.core" in sys.modules:
            raise
    try:
        import megatron.core  # noqa: F401  (registers megatron-core's safe globals)
    except ImportError:
        pass
    return _torch_load(path, map_location="cpu", weights_only=not _trusted, **kwargs)


def refused_global(exc: BaseException) -> Optional[str]:
    """The global a guarded unpickler refused, if ``exc`` (or what it wraps, as torch DCP's
    CheckpointException does in its text) is that refusal."""
    while exc is not None:
        found = REFUSED.search(str(exc))
        if found:
            return found.group(1)
        exc = exc.__cause__ or exc.__context__
    return None
