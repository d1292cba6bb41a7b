"""Growing a Hugging Face model into a Hugging Face directory (``--load-hf --save-hf``): the same rank
plan and clone rules as a Megatron destination, written through the HF writer with no megatron-core
model built.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from megaclone.formats import Format, destination, hf
from megaclone.formats.hf.reader import read_config
from megaclone.formats.hf.writer import (
    check_exportable,
    hf_config,
    hf_pieces,
    hf_shard,
    write_claimed_hf,
)
from megaclone.formats.source import open_source
from megaclone.memory import PeakMemory
from megaclone.model import RowBlock, Slots
from megaclone.pipeline.clone import CloneConfig
from megaclone.pipeline.expand import RankReport, destination_spec, fill_rank, gather_reports, plan_growth
from megaclone.pipeline.index_maps import layer_map
from megaclone.pipeline.plan import SliceTask
from megaclone.runtime import agree, deal, return_large_frees
from megaclone.shape.layout import catalogue
from megaclone.shape.request import Depth, Factors


def expand_to_hf(
    src_root: str | Path,
    out: str | Path,
    factors: Factors,
    cfg: CloneConfig = CloneConfig(),
    depth: Depth = Depth(),
    overwrite: bool = False,
    dtype: Optional[torch.dtype] = None,
    on_slice: Optional[Callable[[SliceTask, int], None]] = None,
    allow_non_finite: bool = False,
) -> list[RankReport]:
    """Grow a Hugging Face model straight into a Hugging Face directory, any number of ranks, no
    Megatron checkpoint in between: the destination's (tensor, layer) pieces are dealt to ranks by
    size; each rank computes its whole pieces (reading only the source rows and columns they need),
    turns them into the family's HF tensors and writes one safetensors shard (formats.hf.writer.write_hf)."""
    start = time.perf_counter()
    return_large_frees()
    memory = PeakMemory().start()
    try:
        out, src_root = Path(out), Path(src_root)
        rank, world = dist.get_rank(), dist.get_world_size()

        def validate():
            source = open_source(src_root, Format.HF)
            dst_spec = destination_spec(source, factors, 1, depth)  # whole tensors: TP 1's layout
            model_type = source.args.hf_model_type
            check_exportable(dst_spec, model_type, src_root)
            return source, dst_spec, model_type

        source, dst_spec, model_type = agree(validate)
        with destination.Claim.take(out, destination.Kind.HF, [src_root], overwrite) as claim:
            report = RankReport(rank=rank)
            dtype = dtype or source.dtype
            pieces, sizes = hf_pieces(dst_spec)
            tensors = {t.key: t for t in catalogue(dst_spec)}
            # whole (tensor, layer) pieces; a per-expert tensor's experts x rows x cols, a slot per expert
            whole = {(key, layer): torch.empty((max(1, tensors[key].experts),) + tensors[key].shape, dtype=dtype)
                     for (key, layer), who in zip(pieces, deal(sizes, world)) if who == rank}
            slots: Slots = {(key, layer, e if tensors[key].experts else None): [RowBlock(0, t.shape[1], t[e])]
                            for (key, layer), t in whole.items() for e in range(t.shape[0])}
            growth = plan_growth(source, dst_spec, cfg, depth, allow_non_finite)  # once a run
            agree(lambda: fill_rank(growth, slots, report, on_slice=on_slice, only_slots=True))
            layout = hf.family_of(model_type).layout(dst_spec)

            def fulls():  # each piece freed as its HF tensors are made
                for key, layer in list(whole):
                    full = whole.pop((key, layer))
                    yield key, layer, full if tensors[key].experts else full[0]

            t0 = time.perf_counter()
            src_layer_of, _ = layer_map(depth, source.spec.num_layers)(np.arange(dst_spec.num_layers))
            config = hf_config(dst_spec, model_type, dtype, read_config(source.path), src_layer_of)
            write_claimed_hf(claim, out, lambda: hf_shard(layout, model_type, fulls()), config, source.path)
        report.seconds["write"] = time.perf_counter() - t0
        report.seconds["total"] = time.perf_counter() - start
        return gather_reports(report, memory)
    finally:
        memory.stop()  # a refusal or a failure must not leave the sampler running in the caller
