"""The file formats megaclone reads and writes, behind one boundary; nothing here clones.

- ``base``: the one reader interface (``Source``: a validated checkpoint that reads any box of any
  Megatron tensor) and what it reads (``Box``, ``BoxRead``, ``TensorMeta``);
- ``source.open_source``: any checkpoint as a ``Source``, by format or by what the path holds;
- ``torch_dist`` (megatron-core dist_checkpointing), ``legacy`` (Megatron-LM's per-rank files),
  ``hf`` (Hugging Face directories, one file per model family): each format's reader and writer;
- ``iterations``: a Megatron checkpoint directory (iteration directories, the tracker written last);
- ``destination``: the one guard and claim on what we write; ``unpickling``: the pickle allowlist;
  ``describe``: a checkpoint's summary for inspect_checkpoint.

This module stays torch-free: the tools parse their flags (and ``--save-format`` its choices) before
torch loads.
"""

import enum


class Format(str, enum.Enum):
    """A checkpoint's file format; the values are Megatron-LM's ``--ckpt-format`` names (and ``hf``)."""

    TORCH_DIST = "torch_dist"  # megatron-core dist_checkpointing: .distcp shards and metadata
    LEGACY = "torch"  # Megatron-LM's legacy files: mp_rank_XX[_YYY]/model_optim_rng.pt
    HF = "hf"  # a Hugging Face save_pretrained directory (config.json and safetensors)

    def __str__(self) -> str:
        return self.value
