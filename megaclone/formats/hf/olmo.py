"""OLMo (the first): Llama's layout with non-parametric LayerNorms, kept as constant weight 1 and bias 0.
"""

from __future__ import annotations

from typing import Optional

from megaclone.formats.hf.configs import require
from megaclone.formats.hf.llama import Llama
from megaclone.formats.hf.mapping import HFTensor, constant
from megaclone.formats.hf.registry import register
from megaclone.shape.layout import ATTENTION, MLP
from megaclone.shape.spec import ModelSpec


@register
class OLMo(Llama):
    name = "olmo"
    model_types = {"olmo": "OlmoForCausalLM"}
    grouped_query = True

    def args_from_config(self, c: dict) -> dict:
        require(c, c.get("clip_qkv") is None, f"clip_qkv={c.get('clip_qkv')}", "megatron-core does not clamp q/k/v: "
                 "only OLMo models without clip_qkv convert")
        args = super().args_from_config(c)
        # OLMo's LayerNorm has no weight or bias: a megatron-core LayerNorm with weight 1 and bias 0 (trainable)
        return dict(args, normalization="LayerNorm", norm_epsilon=1e-5)

    def layout(self, s: ModelSpec) -> dict[str, HFTensor]:
        out = super().layout(s)
        for key in (ATTENTION + "linear_qkv.layer_norm_", MLP + "linear_fc1.layer_norm_", "decoder.final_layernorm."):
            out[key + "weight"], out[key + "bias"] = constant(1.0), constant(0.0)
        return out

    def config_from_spec(self, s: ModelSpec, model_type: str) -> dict:
        return dict(super().config_from_spec(s, model_type), clip_qkv=None)

    def exports_as(self, s: ModelSpec) -> Optional[str]:
        rope = s.position_embedding_type == "rope" and s.normalization == "LayerNorm"
        return "olmo" if rope and s.swiglu and not s.add_bias_linear else None
