"""Export a Megatron checkpoint (torch_dist or legacy) to a Hugging Face directory that transformers loads.

Any world size: the (tensor, layer) pieces are dealt to ranks by size; each rank reads its own pieces
one at a time through the source's reader (``formats.base.Source``, no collective), turns each into
the family's HF tensors and writes one safetensors shard. Rank 0 writes the index, then
``config.json`` last, after every shard is on disk: a directory without ``config.json`` is not a
loadable model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megaclone.formats import destination, hf
from megaclone.formats.base import Box, BoxRead
from megaclone.formats.hf.writer import (
    check_exportable,
    hf_config,
    hf_pieces,
    hf_shard,
    write_claimed_hf,
)
from megaclone.formats.source import open_megatron_source
from megaclone.runtime import agree, deal


def export_hf(root: str | Path, out: str | Path, model_type: Optional[str] = None, overwrite: bool = False) -> dict:
    """Write ``out`` (config.json, safetensors shards, index, tokenizer files); all ranks call it."""
    out = Path(out)
    rank, world = dist.get_rank(), dist.get_world_size()

    def validate():
        source = open_megatron_source(root)
        mtype = model_type or getattr(source.args, "hf_model_type", None) or hf.infer_model_type(source.spec)
        check_exportable(source.spec, mtype, source.path)
        return source, mtype

    source, mtype = agree(validate)
    spec = source.spec
    layout = hf.family_of(mtype).layout(spec)
    with destination.Claim.take(out, destination.Kind.HF, [Path(root), source.path], overwrite) as claim:
        pieces, sizes = hf_pieces(spec)

        def fulls():  # this rank's share of the (tensor, layer) pieces, read whole
            for (key, layer), who in zip(pieces, deal(sizes, world)):
                if who == rank:
                    shape = source.tensors[key].shape[1:] if layer is not None else source.tensors[key].shape
                    [full] = source.read(BoxRead(key, layer, (Box.whole(shape),)))
                    yield key, layer, full

        tokenizer = getattr(source.args, "tokenizer_model", None)
        count = write_claimed_hf(claim, out, lambda: hf_shard(layout, mtype, fulls()),
                                 hf_config(spec, mtype, source.dtype), Path(tokenizer) if tokenizer else None)
    return {"model_type": mtype, "tensors": count, "files": world}
