"""Mixtral: Mistral's attention, every MLP a mixture of experts (``block_sparse_moe``: a router ``gate``
and experts of w1 (gate), w3 (up), w2 (down)); softmax over the experts, top-k, renormalized, which is
megatron-core's default routing.
"""

from __future__ import annotations

from typing import Optional

from megaclone.formats.hf.configs import mixture_args, mixture_config
from megaclone.formats.hf.llama import Llama
from megaclone.formats.hf.mapping import HFTensor, mixture_tensors, without_dense_mlp
from megaclone.formats.hf.registry import register
from megaclone.shape.layout import MLP
from megaclone.shape.spec import ModelSpec


@register
class Mixtral(Llama):
    name = "mixtral"
    model_types = {"mixtral": "MixtralForCausalLM"}
    experts = True

    def args_from_config(self, c: dict) -> dict:
        dense = {**c, "model_type": "llama"}
        return dict(super().args_from_config(dense), **mixture_args(c, "num_local_experts", "intermediate_size",
                                                                   norm_topk_default=True))

    def layout(self, s: ModelSpec) -> dict[str, HFTensor]:
        out = without_dense_mlp(super().layout(s))
        out.update(mixture_tensors(MLP, "block_sparse_moe.gate.weight", "block_sparse_moe.experts", ("w1.weight",
                                   "w3.weight", "w2.weight"), s, "model.layers.{i}."))
        return out

    def config_from_spec(self, s: ModelSpec, model_type: str) -> dict:
        out = dict(super().config_from_spec(s, model_type), **mixture_config(s, "num_local_experts",
                                                                            "intermediate_size"))
        out.pop("norm_topk_prob")  # Mixtral always renormalizes
        for field in ("attention_bias", "mlp_bias"):
            out.pop(field)
        return out

    def cannot_hold(self, s: ModelSpec) -> Optional[str]:
        if s.experts and (s.experts.pre_softmax or s.experts.shared_ffn_hidden_size):
            return "softmax before top-k or a shared expert (Mixtral renormalizes its top-k and has no shared expert)"
        return super().cannot_hold(s)

    def exports_as(self, s: ModelSpec) -> Optional[str]:
        return None  # a Megatron mixture exports with --model-type
