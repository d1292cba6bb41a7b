"""Checkpoint I/O in Megatron-LM's layout through megatron-core ``dist_checkpointing`` (torch_dist).

``<root>/latest_checkpointed_iteration.txt`` names ``iter_NNNNNNN`` (or ``release``), which holds the
torch_dist files and the common state (args, iteration: everything not sharded). This module reads
boxes of stored global tensors and saves sharded state dicts; it knows nothing of cloning.

It is also where megatron-core's versions meet. The common state has two forms: ``common.pt``
(megatron-core up to 0.18) and one ``ShardedObject`` named ``common_state`` inside the torch_dist
files (0.19 on, which still reads ``common.pt``). :func:`read_common`, :func:`load` and
:func:`load_plain_tensors` read both whatever megatron-core is installed; saving writes the form the
installed megatron-core writes. Every reader of a torch_dist checkpoint goes through them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from megaclone.errors import MegacloneError, reading, refusing_code, writing
from megaclone.formats import unpickling
from megaclone.formats.base import BoxRead, Source, TensorMeta
from megaclone.formats.iterations import (
    LATEST,
    iteration_dirname,
    publish,
    read_tracker,
)
from megaclone.shape.layout import catalogue
from megaclone.shape.spec import ModelSpec

unpickling.guard()  # no checkpoint read in this process runs code from its pickles


COMMON_FILE = "common.pt"  # the common state up to megatron-core 0.18
COMMON_OBJECT = "common_state"  # from 0.19: ShardedObject("common_state", state, (1,), (0,))


def read_common(ckpt: Path) -> dict[str, Any]:
    """The common state: args, iteration, checkpoint_version (everything not sharded), in either form.
    Read with torch alone (megatron-core's ``load_common_state_dict`` is a ``torch.load`` of the same
    file), so inspecting a checkpoint needs no megatron-core."""
    in_file = (ckpt / COMMON_FILE).exists()
    if not in_file and not has_stored(ckpt, COMMON_OBJECT):
        raise MegacloneError(f"{ckpt} holds no common state (neither {COMMON_FILE} nor a '{COMMON_OBJECT}' entry)",
                             "the checkpoint is incomplete: save it again")
    with reading(ckpt / "metadata.json"):  # megatron-core reads it first, as JSON
        json.loads((ckpt / "metadata.json").read_text())
    where = ckpt / COMMON_FILE if in_file else ckpt / ".metadata"  # the file messages name
    with reading(where, f"the common state in {where}"):
        common = unpickling.load(ckpt / COMMON_FILE) if in_file else _common_state_object(ckpt)
    if "args" not in common:
        raise MegacloneError(
            f"{where} holds no 'args'",
            "megaclone needs a checkpoint written by Megatron-LM training (or megaclone), which stores its args",
        )
    return common


def _common_state_object(ckpt: Path) -> dict[str, Any]:
    """The common state as megatron-core 0.19 stores it, read with torch DCP itself (megatron-core
    packs a ShardedObject's data as ``torch.save([data])``), so any megatron-core version reads it."""
    import io

    from torch.distributed import checkpoint as dcp

    key = f"{COMMON_OBJECT}/shard_0_1"
    state: dict[str, Any] = {key: io.BytesIO()}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(ckpt)), no_dist=True)
    value = state[key]
    if isinstance(value, io.BytesIO):
        value.seek(0)
        value = torch.load(value, weights_only=True)
    return value[0]


def _common_strategy(ckpt: Path) -> Optional[Any]:
    """For a megatron-core that reads only ``common.pt`` (its ``load`` takes a common strategy) and a
    checkpoint without one: a strategy that reads the ``common_state`` object instead."""
    import inspect

    from megatron.core import dist_checkpointing

    if (ckpt / COMMON_FILE).exists() or "common_strategy" not in inspect.signature(dist_checkpointing.load).parameters:
        return None
    from megatron.core.dist_checkpointing.strategies.common import (
        TorchCommonLoadStrategy,
    )

    class CommonStateObject(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            return _common_state_object(Path(checkpoint_dir))

    return CommonStateObject()


def load(sharded_state_dict: dict[str, Any], ckpt: Path, **kwargs) -> dict[str, Any]:
    """megatron-core's ``dist_checkpointing.load`` (collective) of a checkpoint in either form; a
    pickled object outside the allowlist is refused by name."""
    from megatron.core import dist_checkpointing

    strategy = _common_strategy(Path(ckpt))
    if strategy is not None:
        kwargs["common_strategy"] = strategy
    with refusing_code(ckpt):
        return dist_checkpointing.load(sharded_state_dict, str(ckpt), **kwargs)


def load_plain_tensors(ckpt: Path) -> dict[str, Any]:
    """Every stored tensor whole, as megatron-core's ``load_plain_tensors`` (collective)."""
    from megatron.core import dist_checkpointing

    with reading(ckpt / ".metadata", f"the torch_dist metadata {ckpt / '.metadata'}"):
        metadata = dist_checkpointing.load_tensors_metadata(str(ckpt))
    return load(metadata, ckpt, validate_access_integrity=False)


def read_tensor_metadata(ckpt: Path) -> dict[str, TensorMeta]:
    """Global shape and dtype of every stored tensor, keyed by its torch_dist key: torch DCP's own
    metadata (what megatron-core's ``load_tensors_metadata`` reads), without megatron-core."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    with reading(ckpt / ".metadata", f"the torch_dist metadata {ckpt / '.metadata'} (or metadata.json)"):
        json.loads((ckpt / "metadata.json").read_text())
        meta = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    return {key: TensorMeta(tuple(t.size), t.properties.dtype) for key, t in meta.items()
            if isinstance(t, TensorStorageMetadata)}


def has_stored(ckpt: Path, prefix: str) -> bool:
    """Whether the checkpoint stores any entry under ``prefix`` (e.g. the RNG state's ShardedObject)."""
    from torch.distributed.checkpoint import FileSystemReader

    with reading(ckpt / ".metadata"):
        keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    return any(k == prefix or k.startswith(prefix + "/") for k in keys)


def check_storage(ckpt: Path) -> int:
    """Every data file the metadata refers to exists and is long enough; returns the total bytes."""
    from torch.distributed.checkpoint import FileSystemReader

    with reading(ckpt / ".metadata"):
        storage = FileSystemReader(str(ckpt)).read_metadata().storage_data
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = ckpt / name
        if not path.exists():
            raise MegacloneError(f"shard file {path} is missing", "copy the complete checkpoint directory")
        if path.stat().st_size < size:
            raise MegacloneError(
                f"shard file {path} is truncated ({path.stat().st_size} bytes, metadata needs {size})",
                "copy the complete checkpoint directory again",
            )
    return sum(needed.values())


class BoxReader:
    """Boxes of a torch_dist checkpoint's stored tensors, read by this rank alone.

    megatron-core's ``dist_checkpointing.load`` is collective: every call plans the load on all ranks
    together (two collectives), which costs more than the bytes once each rank wants only its own
    boxes (65 ms per call at 8 ranks here, 6 ms alone). This reads through the same torch DCP
    ``FileSystemReader`` megatron-core's torch_dist strategy uses. The metadata is read once. A
    stacked tensor is addressed as plain N-D with a layer extent of 1.

    torch DCP deserializes a stored chunk whole for every read item that touches it (``torch.load``,
    then a narrow), so each overlapped chunk is read once, whole, and every box of the read is cut
    from it; the chunks of the last read are kept for the next (the experts of one layer, or the
    copies of one source layer, read the same chunks one after another). At most one read's chunks
    are held at a time.
    """

    # A stored chunk larger than this (elements) is read box by box instead, as torch DCP would.
    WHOLE_CHUNK_LIMIT = 1 << 28

    def __init__(self, ckpt: Path):
        from torch.distributed.checkpoint import FileSystemReader

        self.path = ckpt
        self._reader = FileSystemReader(str(ckpt))
        self._metadata = self._reader.read_metadata()
        self._reader.set_up_storage_reader(self._metadata, is_coordinator=True)
        self._held: dict[tuple[str, int], torch.Tensor] = {}  # (key, chunk index) -> the chunk, whole

    def read(self, read: BoxRead) -> list[torch.Tensor]:
        """The read's boxes, one tensor each (shaped as the box)."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        stored = self._metadata.state_dict_metadata[read.key]
        lead = () if read.layer is None else (read.layer,)
        wanted = [ChunkStorageMetadata(offsets=torch.Size(lead + box.offsets),
                                       sizes=torch.Size((1,) * len(lead) + box.lengths)) for box in read.boxes]
        # per box: (chunk index, slices into the box, slices into the chunk) of every chunk it meets
        overlaps = [[(i, *where) for i, c in enumerate(stored.chunks) if (where := _overlap(w, c)) is not None]
                    for w in wanted]
        needed = sorted({i for found in overlaps for i, _, _ in found})
        if any(math.prod(stored.chunks[i].sizes) > self.WHOLE_CHUNK_LIMIT for i in needed):
            self._held = {}
            return self._read_items(read.key, stored, wanted, read.boxes)
        self._held = {k: v for k, v in self._held.items() if k[0] == read.key and k[1] in needed}
        missing = [i for i in needed if (read.key, i) not in self._held]
        for i, buffer in zip(missing, self._read_items(read.key, stored, [stored.chunks[i] for i in missing])):
            self._held[(read.key, i)] = buffer
        out = []
        for want, found, box in zip(wanted, overlaps, read.boxes):
            buffer = torch.empty(want.sizes, dtype=stored.properties.dtype)
            covered = 0
            for i, inside_box, inside_chunk in found:
                buffer[inside_box] = self._held[(read.key, i)][inside_chunk]
                covered += math.prod(s.stop - s.start for s in inside_box)
            if covered != buffer.numel():
                raise self._uncovered(read.key, want)
            out.append(buffer.view(box.lengths))
        return out

    def _read_items(self, key: str, stored, chunks: list, boxes=None) -> list[torch.Tensor]:
        """``chunks`` (global extents) of ``key`` into fresh tensors, in one pass over the files, with
        the read items torch DCP's own resharding helper computes; shaped as ``boxes`` if given."""
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import (
            create_read_items_for_chunk_list,
        )

        targets: dict[tuple[str, torch.Size], torch.Tensor] = {}
        items, out = [], []
        for n, chunk in enumerate(chunks):
            buffer = torch.empty(chunk.sizes, dtype=stored.properties.dtype)
            chunk_items = create_read_items_for_chunk_list(key, stored, [chunk])
            if sum(math.prod(i.lengths) for i in chunk_items) != buffer.numel():
                raise self._uncovered(key, chunk)
            targets[(key, chunk.offsets)] = buffer
            items += chunk_items
            out.append(buffer if boxes is None else buffer.view(boxes[n].lengths))
        if items:
            with reading(self.path, f"{key} from {self.path}"):  # shard bytes torch.load cannot parse
                self._reader.read_data(LoadPlan(items), _IntoBuffers(targets)).wait()
        return out

    def _uncovered(self, key: str, extent) -> MegacloneError:
        return MegacloneError(f"{self.path}: the stored chunks of {key} do not cover "
                              f"{tuple(extent.offsets)} + {tuple(extent.sizes)}", "the checkpoint is damaged")


def _overlap(box, chunk) -> Optional[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """Where two global extents meet: (slices into the box, slices into the chunk), or None."""
    lo = [max(b, c) for b, c in zip(box.offsets, chunk.offsets)]
    hi = [min(b + bn, c + cn) for b, bn, c, cn in zip(box.offsets, box.sizes, chunk.offsets, chunk.sizes)]
    if any(h <= l for l, h in zip(lo, hi)):
        return None
    return (tuple(slice(l - b, h - b) for l, h, b in zip(lo, hi, box.offsets)),
            tuple(slice(l - c, h - c) for l, h, c in zip(lo, hi, chunk.offsets)))


class _IntoBuffers:
    """The two calls torch DCP's ``read_data`` makes of a load planner: where each read item goes."""

    def __init__(self, targets: dict[tuple[str, torch.Size], torch.Tensor]):
        self.targets = targets

    def resolve_tensor(self, item) -> torch.Tensor:
        target = self.targets[(item.dest_index.fqn, item.dest_index.offset)]
        return target[tuple(slice(o, o + n) for o, n in zip(item.dest_offsets, item.lengths))]

    def commit_tensor(self, item, tensor: torch.Tensor) -> None:
        pass


def _install_write_results_queue() -> None:
    """Give dist_checkpointing's writer an in-process results queue.

    megatron-core's default is a queue served by a multiprocessing manager it spawns on the first
    save: a fresh interpreter per rank, all starting at once (about 10 s of a TP 8 save on 2 cores
    here), and a process that outlives the rank if the rank is killed. A synchronous save writes and
    collects in the rank itself (its forked writers report to it over their own queue), so a plain
    ``queue.Queue`` serves: no helper process at all. megatron-core 0.14 runs even a synchronous
    save through a forked async caller, which only the manager's queue reaches: it keeps its own.
    """
    import queue

    from megatron.core import __version__ as mcore_version
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if tuple(int(p) for p in mcore_version.split(".")[:2]) < (0, 15):
        return
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


@contextlib.contextmanager
def _without_zip_crc() -> Iterator[None]:
    """torch.save without the zip records' CRC-32 (torch's own ``compute_crc32`` switch).

    torch.load, which torch DCP and so Megatron-LM use to read these files, never checks it, and
    computing it costs about a quarter of the writing time here. The layout is unchanged.
    """
    try:
        from torch.utils.serialization import config
    except ImportError:  # torch without the switch: write as usual
        yield
        return
    before = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = before


def save_sharded(ckpt: Path, sharded_state_dict: dict[str, Any]) -> None:
    """Write this rank's part of a sharded state dict (every rank calls it together)."""
    from megatron.core import dist_checkpointing

    _install_write_results_queue()
    ckpt.mkdir(parents=True, exist_ok=True)
    with _without_zip_crc():
        dist_checkpointing.save(sharded_state_dict, str(ckpt))


def open_torch_dist_source(root: str | Path, vocab_size: Optional[int] = None) -> Source:
    """A Megatron-LM torch_dist checkpoint: args present, every tensor the model needs stored with the
    shape its args imply, every shard file present and complete."""
    path = find_checkpoint(root)
    common = read_common(path)
    spec = ModelSpec.from_args(common["args"], vocab_size=vocab_size)
    tensors = read_tensor_metadata(path)
    check_storage(path)
    expected = catalogue(spec)
    for tensor in expected:
        meta = tensors.get(tensor.key)
        if meta is None:
            raise MegacloneError(
                f"the source checkpoint {path} has no tensor {tensor.key!r}, which its args imply",
                "check that the args in common.pt describe the saved model (e.g. swiglu, add_bias_linear, "
                "position_embedding_type, untie_embeddings_and_output_weights)",
            )
        if meta.shape != tensor.stored_shape(spec.num_layers):
            raise MegacloneError(
                f"source tensor {tensor.key!r} has shape {meta.shape}, but the checkpoint args imply "
                f"{tensor.stored_shape(spec.num_layers)}",
                "the checkpoint args do not match its weights; fix the args or re-save the checkpoint",
            )
    dtypes = {tensors[t.key].dtype for t in expected}
    if len(dtypes) != 1:
        raise MegacloneError(f"source parameters mix dtypes {sorted(map(str, dtypes))}", "save the source in one dtype")

    return Source(path, spec, common["args"], tensors, dtypes.pop(), BoxReader(path).read,
                  clone_record=common.get("megaclone"))


def save_checkpoint(root: Path, iteration: int, state: dict[str, Any]) -> Path:
    """Save a sharded state dict as ``<root>/iter_NNNNNNN`` (all ranks together), then, once every
    rank has finished, publish it by writing the tracker file. A crash before that leaves no
    checkpoint that looks complete."""
    path = Path(root) / iteration_dirname(iteration)
    with writing(root, path):
        save_sharded(path, state)
    publish(Path(root), iteration)
    return path


def is_torch_dist(root: str | os.PathLike) -> bool:
    """Whether ``root`` is a torch_dist checkpoint (an iteration directory, or a root whose tracker names one)."""
    try:
        find_checkpoint(root)
        return True
    except MegacloneError:
        return False


def find_checkpoint(root: str | os.PathLike) -> Path:
    """The iteration directory of a Megatron-LM checkpoint root (or the directory itself if it is one)."""
    root = Path(root)
    if not root.exists():
        raise MegacloneError(f"checkpoint directory {root} does not exist", "pass the directory given to --save in training")
    if not root.is_dir():
        raise MegacloneError(f"{root} is a file, not a checkpoint directory",
                             "pass the directory given to --save in training")
    if (root / "metadata.json").exists():
        return root
    path = root / iteration_dirname(read_tracker(root))
    if not (path / "metadata.json").exists():
        raise MegacloneError(
            f"{root / LATEST} names {path.name}, but {path} is missing or is not a torch_dist checkpoint",
            "save with --ckpt-format torch_dist (the default), or pass the right directory",
        )
    return path
