"""Hugging Face directories as sources and destinations, one file per model family.

``registry`` (the families and their lookup), ``mapping`` (where a Megatron tensor's rows live in HF
files), ``reader`` (an HF directory as a ``Source``), ``writer`` (full Megatron tensors to HF files).
Importing the package registers every family; it stays torch-free.
"""

from megaclone.formats.hf import gpt2, gpt_neox, llama, olmo, opt  # noqa: F401  (each registers itself)
from megaclone.formats.hf.registry import (
    CANNOT_EXPRESS,
    Family,
    families,
    family_of,
    infer_model_type,
    model_types,
)

__all__ = ["CANNOT_EXPRESS", "Family", "families", "family_of", "infer_model_type", "model_types"]
