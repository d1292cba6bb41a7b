"""Baselines for the benchmark: the naive full-materialization path and the write floor.

- naive: what every other tool does — each process loads the whole source, builds the whole
  destination, then saves its shard of it;
- floor: the same ranks save the same shards through dist_checkpointing with nothing read and no
  math, the least any expander writing this format can cost;
- disk: the same bytes from the same memory written to one plain file per rank: the disk's own speed.
naive and floor write real checkpoints in the same layout, so the comparison with ``expand`` is like
for like.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megaclone.formats import destination, torch_dist
from megaclone.formats.torch_dist import open_torch_dist_source
from megaclone.memory import PeakMemory
from megaclone.model import (
    build_gpt,
    model_sharded_state_dict,
    parameter_slots,
    save_megatron,
)
from megaclone.pipeline.clone import CloneConfig, SourcePiece, clone_slice
from megaclone.pipeline.expand import RankReport, destination_spec
from megaclone.pipeline.rules import dst_slice, param_rules
from megaclone.runtime import cpu_seconds, init_parallel
from megaclone.shape.request import Depth, Factors
from megaclone.shape.spec import Experts


def _prepare(src_root: Path, dst_root: Path, factors: Factors, tp: int, depth: Depth = Depth(),
             experts: Optional[Experts] = None, expert_parallel: int = 1):
    source = open_torch_dist_source(src_root)
    dst_spec = destination_spec(source, factors, tp, depth, experts, expert_parallel)
    if dist.get_rank() == 0:
        destination.clear(destination.guard(dst_root, destination.Kind.MEGATRON, [src_root], overwrite=True))
    dist.barrier()
    return source, dst_spec


def naive_expand(src_root: Path, dst_root: Path, factors: Factors, tp: int,
                 cfg: CloneConfig = CloneConfig()) -> RankReport:
    """Whole source in, whole destination built in every process, then each saves its shard."""
    from megatron.core import parallel_state

    memory = PeakMemory().start()
    report = RankReport(rank=dist.get_rank())
    start, cpu_start = time.perf_counter(), cpu_seconds()
    source, dst_spec = _prepare(Path(src_root), Path(dst_root), factors, tp)
    t0 = time.perf_counter()
    full_src = torch_dist.load_plain_tensors(source.path)
    t1 = time.perf_counter()
    rules = param_rules(source.spec, dst_spec)
    full_dst: dict[tuple[str, int | None], torch.Tensor] = {}
    for rule in rules:
        rows = np.arange(rule.rows.src_size)
        cols = None if rule.cols is None else np.arange(rule.cols.src_size)
        for layer in rule.tensor.layers(source.spec.num_layers):
            data = full_src[rule.key] if layer is None else full_src[rule.key][layer]
            piece = SourcePiece(data, rows, cols)
            full_dst[(rule.key, layer)] = clone_slice(
                rule, layer or 0, piece, np.arange(rule.rows.dst_size),
                None if rule.cols is None else np.arange(rule.cols.dst_size), cfg)
    del full_src
    init_parallel(tp)
    model = build_gpt(dst_spec, dtype=source.dtype)
    model_sd = model_sharded_state_dict(model)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    by_key = {r.key: r for r in rules}
    with torch.no_grad():
        for (key, layer, _), [target] in parameter_slots(model_sd).items():
            rows, cols = dst_slice(by_key[key], tp, tp_rank)
            full = full_dst[(key, layer)]
            target.tensor.copy_(full[torch.from_numpy(rows)] if cols is None else full[np.ix_(rows, cols)])
    report.bytes_read = sum(int(np.prod(m.shape)) * torch.tensor([], dtype=m.dtype).element_size()
                            for m in source.tensors.values())
    report.bytes_computed = sum(t.numel() * t.element_size() for t in full_dst.values())
    del full_dst
    t2 = time.perf_counter()
    save_megatron(Path(dst_root), 0, model_sd, dst_spec.to_args(source.args))
    t3 = time.perf_counter()
    report.seconds = {"validate": t0 - start, "read": t1 - t0, "compute": t2 - t1, "write": t3 - t2,
                      "total": t3 - start, "cpu": cpu_seconds() - cpu_start}
    report.peak_rss = memory.stop()
    return report


def write_floor(src_root: Path, dst_root: Path, factors: Factors, tp: int, raw: bool = False,
                depth: Depth = Depth(), experts: Optional[Experts] = None, expert_parallel: int = 1) -> RankReport:
    """Save shards of the destination's size and layout (width, depth and experts as ``expand`` would
    grow them) with nothing read and no math.

    With ``raw`` the same tensors go to one plain file per rank instead (written whole, fsync'd, as
    dist_checkpointing's writers do): what the disk itself allows, with no format at all.
    """
    memory = PeakMemory().start()
    report = RankReport(rank=dist.get_rank())
    start, cpu_start = time.perf_counter(), cpu_seconds()
    source, dst_spec = _prepare(Path(src_root), Path(dst_root), factors, tp, depth, experts, expert_parallel)
    t0 = time.perf_counter()
    init_parallel(tp, 1, dst_spec.expert_parallel)
    model_sd = model_sharded_state_dict(build_gpt(dst_spec, dtype=source.dtype))
    # the expander's own layout of the shard in memory (see model.parameter_slots)
    blocks = [b.tensor for slot in parameter_slots(model_sd, own_storage=True).values() for b in slot]
    tb = time.perf_counter()
    with torch.no_grad():
        for tensor in blocks:
            tensor.fill_(0.5)
    report.bytes_computed = sum(t.numel() * t.element_size() for t in blocks)
    t1 = time.perf_counter()
    if raw:
        _write_raw(Path(dst_root) / f"rank{dist.get_rank()}.bin", blocks)
    else:
        del blocks
        save_megatron(Path(dst_root), 0, model_sd, dst_spec.to_args(source.args))
    t2 = time.perf_counter()
    report.seconds = {"validate": t0 - start, "build": tb - t0, "compute": t1 - tb, "write": t2 - t1,
                      "total": t2 - start, "cpu": cpu_seconds() - cpu_start}
    report.peak_rss = memory.stop()
    return report


def _write_raw(path: Path, tensors: list[torch.Tensor]) -> None:
    with open(path, "wb") as f:
        for t in tensors:
            f.write(memoryview(t.detach().contiguous().view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    dist.barrier()
