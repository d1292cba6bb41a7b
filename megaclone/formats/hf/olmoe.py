"""OLMoE: Llama's layer with q and k normalized over the whole projection (as OLMo-2) and every MLP a
mixture of experts (``mlp.gate`` router, experts of gate/up/down projections), top-k of the softmax not
renormalized by default (megatron-core's pre-softmax). Hugging Face to Hugging Face only: megatron-core
normalizes q and k per head.
"""

from __future__ import annotations

from megaclone.formats.hf.configs import mixture_args, mixture_config, require
from megaclone.formats.hf.llama import Llama
from megaclone.formats.hf.mapping import HFTensor, identity, mixture_tensors, without_dense_mlp
from megaclone.formats.hf.registry import register
from megaclone.shape.layout import ATTENTION, MLP
from megaclone.shape.spec import ModelSpec


@register
class OLMoE(Llama):
    name = "olmoe"
    model_types = {"olmoe": "OlmoeForCausalLM"}
    experts = True
    features = frozenset({"qk_norm_over_projection"})

    def args_from_config(self, c: dict) -> dict:
        require(c, c.get("clip_qkv") is None, "clip_qkv", "an OLMoE model without q/k/v clipping")
        dense = {**c, "model_type": "llama"}
        return dict(super().args_from_config(dense), qk_layernorm=True, hf_qk_norm_over_projection=True,
                    **mixture_args(c, "num_experts", "intermediate_size", norm_topk_default=False))

    def layout(self, s: ModelSpec) -> dict[str, HFTensor]:
        p = "model.layers.{i}."
        out = without_dense_mlp(super().layout(s))
        for which, width in (("q", s.num_attention_heads), ("k", s.num_query_groups)):  # over the projection
            out[ATTENTION + f"{which}_layernorm.weight"] = HFTensor((p + f"self_attn.{which}_norm.weight",),
                                                                     identity(width * s.kv_channels))
        out.update(mixture_tensors(MLP, "mlp.gate.weight", "mlp.experts",
                                   ("gate_proj.weight", "up_proj.weight", "down_proj.weight"), s, p))
        return out

    def config_from_spec(self, s: ModelSpec, model_type: str) -> dict:
        return dict(super().config_from_spec(s, model_type), **mixture_config(s, "num_experts", "intermediate_size"),
                    clip_qkv=None)

    def exports_as(self, s: ModelSpec):
        return None  # no Megatron model is an OLMoE
