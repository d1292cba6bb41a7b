"""The Hugging Face family registry: each family declares, once, how its config.json and tensors map
onto a megatron-core GPT; one file per family registers itself with ``@register`` (as Megatron-Bridge
registers its bridges).

A family answers four questions: which Megatron-LM args a config.json means (refusing what
megatron-core cannot compute), where each Megatron tensor's rows live in the HF files
(``mapping.HFTensor``), which config.json a Megatron spec writes back, and whether a Megatron model
(not imported from HF) is one of its kind. Torch-free, so the tools' --help can list the families.
"""

from __future__ import annotations

from typing import Optional

from megaclone.errors import MegacloneError
from megaclone.formats.hf.mapping import HFTensor
from megaclone.shape.spec import ModelSpec


class Family:
    """One HF architecture family (several model_types may share one layout, as Llama and Qwen do)."""

    name: str = ""
    model_types: dict[str, str] = {}  # HF model_type -> its transformers class (config.json's architectures)
    grouped_query: bool = False  # transformers' model has key/value heads apart from query heads
    experts: bool = False  # transformers' model is a mixture of experts (its layout places the experts)
    # ModelSpec.hf_only_features its models always have, and those they may have (GPT-NeoX's parallel residual)
    features: frozenset[str] = frozenset()
    optional_features: frozenset[str] = frozenset()

    def args_from_config(self, config: dict) -> dict:
        """Megatron-LM args (TP 1) for a config.json of this family; refuses what megatron-core cannot compute."""
        raise NotImplementedError

    def layout(self, spec: ModelSpec) -> dict[str, HFTensor]:
        """Megatron tensor key -> where its rows live in the HF files."""
        raise NotImplementedError

    def config_from_spec(self, spec: ModelSpec, model_type: str) -> dict:
        """config.json fields (transformers' names) for a Megatron spec."""
        raise NotImplementedError

    def cannot_hold(self, spec: ModelSpec) -> Optional[str]:
        """What of ``spec`` this family's models do not compute (features beyond megatron-core's GPT), if any."""
        have = spec.hf_only_features
        missing, extra = self.features - have, have - self.features - self.optional_features
        if not missing and not extra:
            return None
        return "; ".join(part for part in (
            f"its models have {', '.join(sorted(missing))}, which this model has not" if missing else "",
            f"this model has {', '.join(sorted(extra))}, which its models have not" if extra else "") if part)

    def exports_as(self, spec: ModelSpec) -> Optional[str]:
        """The model_type a Megatron model (not imported from HF) of this family exports as; None if not ours."""
        return None


_FAMILIES: list[Family] = []


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: add a family to the registry (model_types must be new)."""
    taken = set(model_types()) & set(cls.model_types)
    if taken:
        raise ValueError(f"model types {sorted(taken)} are registered twice")
    _FAMILIES.append(cls())
    return cls


def families() -> list[Family]:
    return list(_FAMILIES)


def model_types() -> list[str]:
    """Every HF model_type the registry reads and writes, in registry order."""
    return [t for f in _FAMILIES for t in f.model_types]


def family_of(model_type: str) -> Family:
    for family in _FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(model_types())
    raise MegacloneError(f"Hugging Face model_type {model_type!r} is not supported", f"supported: {supported}")


def infer_model_type(spec: ModelSpec) -> str:
    """The HF model_type a Megatron model (not imported from HF) exports as: the one family that claims it."""
    claims = [t for t in (f.exports_as(spec) for f in _FAMILIES
                          if f.experts == bool(spec.experts) and f.cannot_hold(spec) is None) if t is not None]
    if len(claims) != 1:
        names = ", ".join(model_types())
        problem = ("this model matches no Hugging Face family megaclone exports" if not claims else
                   f"this model matches several Hugging Face families ({', '.join(claims)})")
        raise MegacloneError(f"{problem} ({names})", "pass --model-type explicitly if the layout matches one of them")
    return claims[0]

