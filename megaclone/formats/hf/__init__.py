"""Hugging Face directories as sources and destinations, one file per model family.

``registry`` (the families and their lookup), ``mapping`` (where a Megatron tensor's rows live in HF
files), ``reader`` (an HF directory as a ``Source``), ``writer`` (full Megatron tensors to HF files).
Importing the package registers every family; it stays torch-free.
"""

# each family's file registers it; the order is the registry's (and --help's)
from megaclone.formats.hf import llama, gpt2, opt, olmo, gpt_neox, gemma, gemma2, olmo2  # noqa: F401, I001
from megaclone.formats.hf import mixtral, qwen_moe, olmoe  # noqa: F401, I001  (mixtures of experts)
from megaclone.formats.hf.registry import (
    Family,
    families,
    family_of,
    infer_model_type,
    model_types,
)

__all__ = ["Family", "families", "family_of", "infer_model_type", "model_types"]
