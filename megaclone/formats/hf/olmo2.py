"""OLMo-2: Llama's attention and MLP with no norm before them, an RMSNorm on each branch's output
before the residual add, and q and k normalized over the whole projection (all heads at once).
Hugging Face to Hugging Face only.

Exact under growth: every clone variant makes each head's q (and k) a copy of a source head's, each
source head copied equally often, so a norm over the whole projection sees the source's mean square;
its weight tiles with the heads (docs/hf.md, "OLMo-2").
"""

from __future__ import annotations

from megaclone.formats.hf.configs import require, rope_model_config, rotary_gated_shape
from megaclone.formats.hf.llama import Llama
from megaclone.formats.hf.mapping import HFTensor, identity
from megaclone.formats.hf.registry import register
from megaclone.shape.layout import ATTENTION, MLP
from megaclone.shape.spec import ModelSpec


@register
class OLMo2(Llama):
    name = "olmo2"
    model_types = {"olmo2": "Olmo2ForCausalLM"}
    grouped_query = True
    features = frozenset({"no_pre_norms", "post_norms", "qk_norm_over_projection"})

    def args_from_config(self, c: dict) -> dict:
        require(c, c.get("hidden_act", "silu") == "silu", f"hidden_act {c.get('hidden_act')!r}", "only SiLU (SwiGLU) MLPs")
        require(c, not c.get("attention_bias"), "attention_bias=True", "OLMo-2 models without attention biases only")
        return dict(rotary_gated_shape(c, 1e-5), qk_layernorm=True,
                    untie_embeddings_and_output_weights=not c.get("tie_word_embeddings", False),
                    hf_pre_norms=False, hf_post_norms=True, hf_qk_norm_over_projection=True)

    def layout(self, s: ModelSpec) -> dict[str, HFTensor]:
        p = "model.layers.{i}."
        h = identity(s.hidden_size)
        out = super().layout(s)
        for key in (ATTENTION + "linear_qkv.layer_norm_weight", MLP + "linear_fc1.layer_norm_weight"):
            del out[key]
        for which, width in (("q", s.num_attention_heads), ("k", s.num_query_groups)):  # over the projection
            out[ATTENTION + f"{which}_layernorm.weight"] = HFTensor((p + f"self_attn.{which}_norm.weight",),
                                                                     identity(width * s.kv_channels))
        out[ATTENTION + "linear_proj.post_layernorm_weight"] = HFTensor((p + "post_attention_layernorm.weight",), h)
        out[MLP + "linear_fc2.post_layernorm_weight"] = HFTensor((p + "post_feedforward_layernorm.weight",), h)
        return out

    def config_from_spec(self, s: ModelSpec, model_type: str) -> dict:
        return dict(rope_model_config(s, model_type), num_key_value_heads=s.num_query_groups, head_dim=s.kv_channels,
                    hidden_act="silu", rms_norm_eps=s.norm_epsilon, attention_bias=False)

    def exports_as(self, s: ModelSpec):
        return None  # no Megatron model is an OLMo-2
