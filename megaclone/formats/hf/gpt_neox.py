"""GPT-NeoX and Pythia (its parallel residual grows Hugging Face to Hugging Face only): RoPE over a fraction of each
head, LayerNorm, exact GeLU, biases; query_key_value is fused per head as [q, k, v], Megatron's own order.
"""

from __future__ import annotations

from typing import Optional

from megaclone.formats.hf.configs import require, rope_fields, rope_model_config
from megaclone.formats.hf.mapping import HFTensor, identity
from megaclone.formats.hf.registry import Family, register
from megaclone.shape.layout import LAYERS
from megaclone.shape.spec import ModelSpec


@register
class GPTNeoX(Family):
    name = "gpt_neox"
    model_types = {"gpt_neox": "GPTNeoXForCausalLM"}
    optional_features = frozenset({"parallel_residual"})  # Pythia: Hugging Face to Hugging Face only

    def args_from_config(self, c: dict) -> dict:
        require(c, c.get("hidden_act", "gelu") == "gelu", f"hidden_act {c.get('hidden_act')!r}", "exact GeLU only")
        require(c, c.get("attention_bias", True), "attention_bias=False", "GPT-NeoX with biases only")
        heads = c["num_attention_heads"]
        theta, partial = rope_fields(c)
        return dict(num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"], num_attention_heads=heads,
                    num_query_groups=heads, group_query_attention=False, kv_channels=c["hidden_size"] // heads,
                    ffn_hidden_size=c["intermediate_size"], max_position_embeddings=c["max_position_embeddings"],
                    position_embedding_type="rope", rotary_base=theta, rotary_percent=partial, swiglu=False,
                    normalization="LayerNorm", norm_epsilon=c.get("layer_norm_eps", 1e-5), add_bias_linear=True,
                    add_qkv_bias=False, untie_embeddings_and_output_weights=not c.get("tie_word_embeddings", False),
                    hf_parallel_residual=bool(c.get("use_parallel_residual", True)))

    def layout(self, s: ModelSpec) -> dict[str, HFTensor]:
        p = "gpt_neox.layers.{i}."
        h, ffn = identity(s.hidden_size), identity(s.ffn_hidden_size)
        qkv = identity(3 * s.num_attention_heads * s.kv_channels)  # NeoX fuses per head [q, k, v]: Megatron's MHA order
        out = {
            "embedding.word_embeddings.weight": HFTensor(("gpt_neox.embed_in.weight",), identity(s.vocab_size)),
            "decoder.final_layernorm.weight": HFTensor(("gpt_neox.final_layer_norm.weight",), h),
            "decoder.final_layernorm.bias": HFTensor(("gpt_neox.final_layer_norm.bias",), h),
        }
        for megatron, hf, rows in (
            ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight", h),
            ("self_attention.linear_qkv.layer_norm_bias", "input_layernorm.bias", h),
            ("self_attention.linear_qkv.weight", "attention.query_key_value.weight", qkv),
            ("self_attention.linear_qkv.bias", "attention.query_key_value.bias", qkv),
            ("self_attention.linear_proj.weight", "attention.dense.weight", h),
            ("self_attention.linear_proj.bias", "attention.dense.bias", h),
            ("mlp.linear_fc1.layer_norm_weight", "post_attention_layernorm.weight", h),
            ("mlp.linear_fc1.layer_norm_bias", "post_attention_layernorm.bias", h),
            ("mlp.linear_fc1.weight", "mlp.dense_h_to_4h.weight", ffn),
            ("mlp.linear_fc1.bias", "mlp.dense_h_to_4h.bias", ffn),
            ("mlp.linear_fc2.weight", "mlp.dense_4h_to_h.weight", h),
            ("mlp.linear_fc2.bias", "mlp.dense_4h_to_h.bias", h),
        ):
            out[f"{LAYERS}{megatron}"] = HFTensor((p + hf,), rows)
        if not s.tied:
            out["output_layer.weight"] = HFTensor(("embed_out.weight",), identity(s.vocab_size))
        return out

    def config_from_spec(self, s: ModelSpec, model_type: str) -> dict:
        return dict(rope_model_config(s, model_type), layer_norm_eps=s.norm_epsilon, hidden_act="gelu",
                    use_parallel_residual=s.parallel_residual, attention_bias=True)

    def exports_as(self, s: ModelSpec) -> Optional[str]:
        rope = s.position_embedding_type == "rope" and s.normalization == "LayerNorm"
        return "gpt_neox" if rope and s.add_bias_linear and not s.swiglu else None
