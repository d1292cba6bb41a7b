"""Gemma 2: Gemma with a norm on each branch's output before the residual add (four norms a layer),
soft-capped attention scores and logits and alternating sliding-window layers. Hugging Face to Hugging
Face only. Soft-capping, the attention scale and the window act on values the clone leaves unchanged
(head_dim does not grow); they and every other config field pass through, and a depth-grown model keeps
each source layer's attention type (``layer_types``).
"""

from __future__ import annotations

from megaclone.formats.hf.gemma import Gemma
from megaclone.formats.hf.mapping import HFTensor, identity
from megaclone.formats.hf.registry import register
from megaclone.shape.layout import ATTENTION, MLP
from megaclone.shape.spec import ModelSpec


@register
class Gemma2(Gemma):
    name = "gemma2"
    model_types = {"gemma2": "Gemma2ForCausalLM"}
    features = frozenset({"scaled_embedding", "zero_centered_norms", "post_norms"})
    activation_key = "hidden_activation"

    def args_from_config(self, c: dict) -> dict:
        return dict(super().args_from_config(c), hf_post_norms=True)

    def layout(self, s: ModelSpec) -> dict[str, HFTensor]:
        p = "model.layers.{i}."
        h = identity(s.hidden_size)
        out = super().layout(s)
        out[MLP + "linear_fc1.layer_norm_weight"] = HFTensor((p + "pre_feedforward_layernorm.weight",), h)
        out[ATTENTION + "linear_proj.post_layernorm_weight"] = HFTensor((p + "post_attention_layernorm.weight",), h)
        out[MLP + "linear_fc2.post_layernorm_weight"] = HFTensor((p + "post_feedforward_layernorm.weight",), h)
        return out
