"""Llama and the families that share its layout (Mistral, Qwen2 with q/k/v biases, Qwen3 with per-head
q/k norms): RMSNorm, SwiGLU, RoPE, grouped-query attention, bias-free linears.
"""

from __future__ import annotations

from typing import Optional

from megaclone.formats.hf.configs import require, rope_model_config, rotary_gated_shape
from megaclone.formats.hf.mapping import HFTensor, concat, grouped_qkv, identity
from megaclone.formats.hf.registry import Family, register
from megaclone.shape.layout import ATTENTION, MLP
from megaclone.shape.spec import ModelSpec


@register
class Llama(Family):
    name = "llama"
    model_types = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                   "qwen3": "Qwen3ForCausalLM"}
    grouped_query = True

    def args_from_config(self, c: dict) -> dict:
        require(c, c.get("hidden_act", "silu") == "silu", f"hidden_act {c.get('hidden_act')!r}", "only SiLU (SwiGLU) MLPs")
        require(c, not c.get("mlp_bias") and not c.get("attention_bias"), "attention_bias/mlp_bias on all linears",
                 "only bias-free linears (Qwen2's q/k/v bias is supported)")
        return dict(rotary_gated_shape(c, 1e-6), add_qkv_bias=c["model_type"] == "qwen2",
                    qk_layernorm=c["model_type"] == "qwen3",
                    untie_embeddings_and_output_weights=not c.get("tie_word_embeddings", False))

    def layout(self, s: ModelSpec) -> dict[str, HFTensor]:
        p = "model.layers.{i}."
        qkv = grouped_qkv(s.num_attention_heads, s.num_query_groups, s.kv_channels)
        out = {
            "embedding.word_embeddings.weight": HFTensor(("model.embed_tokens.weight",), identity(s.vocab_size)),
            ATTENTION + "linear_qkv.layer_norm_weight": HFTensor((p + "input_layernorm.weight",), identity(s.hidden_size)),
            ATTENTION + "linear_qkv.weight": HFTensor(tuple(p + f"self_attn.{x}_proj.weight" for x in "qkv"), qkv),
            ATTENTION + "linear_proj.weight": HFTensor((p + "self_attn.o_proj.weight",), identity(s.hidden_size)),
            MLP + "linear_fc1.layer_norm_weight": HFTensor((p + "post_attention_layernorm.weight",), identity(s.hidden_size)),
            MLP + "linear_fc1.weight": HFTensor((p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"), concat(s.ffn_hidden_size)),
            MLP + "linear_fc2.weight": HFTensor((p + "mlp.down_proj.weight",), identity(s.hidden_size)),
            "decoder.final_layernorm.weight": HFTensor(("model.norm.weight",), identity(s.hidden_size)),
        }
        if s.qk_layernorm:
            for which in "qk":
                out[ATTENTION + f"{which}_layernorm.weight"] = HFTensor((p + f"self_attn.{which}_norm.weight",),
                                                                         identity(s.kv_channels))
        if s.add_qkv_bias:
            out[ATTENTION + "linear_qkv.bias"] = HFTensor(tuple(p + f"self_attn.{x}_proj.bias" for x in "qkv"), qkv)
        if not s.tied:
            out["output_layer.weight"] = HFTensor(("lm_head.weight",), identity(s.vocab_size))
        return out

    def config_from_spec(self, s: ModelSpec, model_type: str) -> dict:
        return dict(rope_model_config(s, model_type), num_key_value_heads=s.num_query_groups, head_dim=s.kv_channels,
                    hidden_act="silu", rms_norm_eps=s.norm_epsilon, attention_bias=False, mlp_bias=False)

    def exports_as(self, s: ModelSpec) -> Optional[str]:
        if s.swiglu and s.normalization == "RMSNorm" and s.position_embedding_type == "rope" and not s.add_bias_linear:
            return "qwen3" if s.qk_layernorm else "qwen2" if s.add_qkv_bias else "llama"
        return None
