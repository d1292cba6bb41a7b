"""GPT-2: learned positions, LayerNorm, GeLU, biases, a tied head; Conv1D stores [in, out] (transposed)
and c_attn holds [q_all, k_all, v_all] in one tensor.
"""

from __future__ import annotations

from typing import Optional

from megaclone.formats.hf.configs import require
from megaclone.formats.hf.mapping import HFTensor, grouped_qkv, identity, merged
from megaclone.formats.hf.registry import Family, register
from megaclone.shape.layout import ATTENTION, MLP
from megaclone.shape.spec import ModelSpec


@register
class GPT2(Family):
    name = "gpt2"
    model_types = {"gpt2": "GPT2LMHeadModel"}

    def args_from_config(self, c: dict) -> dict:
        act = c.get("activation_function", "gelu_new")
        require(c, act in ("gelu_new", "gelu_pytorch_tanh", "gelu"), f"activation {act!r}", "GeLU (tanh or exact) only")
        require(c, not c.get("scale_attn_by_inverse_layer_idx"), "scale_attn_by_inverse_layer_idx",
                 "megatron-core scales attention by 1/sqrt(head_dim) only")
        h, heads = c["n_embd"], c["n_head"]
        return dict(num_layers=c["n_layer"], hidden_size=h, num_attention_heads=heads, num_query_groups=heads,
                    group_query_attention=False, kv_channels=h // heads, ffn_hidden_size=c.get("n_inner") or 4 * h,
                    max_position_embeddings=c["n_positions"], position_embedding_type="learned_absolute",
                    swiglu=False, openai_gelu=act != "gelu", normalization="LayerNorm",
                    norm_epsilon=c.get("layer_norm_epsilon", 1e-5), add_bias_linear=True, add_qkv_bias=False,
                    untie_embeddings_and_output_weights=False)

    def layout(self, s: ModelSpec) -> dict[str, HFTensor]:
        p = "transformer.h.{i}."
        width = s.num_attention_heads * s.kv_channels
        qkv = merged(grouped_qkv(s.num_attention_heads, s.num_query_groups, s.kv_channels), [width] * 3)
        h = identity(s.hidden_size)
        ffn = identity(s.ffn_hidden_size)
        return {
            "embedding.word_embeddings.weight": HFTensor(("transformer.wte.weight",), identity(s.vocab_size)),
            "embedding.position_embeddings.weight": HFTensor(("transformer.wpe.weight",), identity(s.max_position_embeddings)),
            ATTENTION + "linear_qkv.layer_norm_weight": HFTensor((p + "ln_1.weight",), h),
            ATTENTION + "linear_qkv.layer_norm_bias": HFTensor((p + "ln_1.bias",), h),
            ATTENTION + "linear_qkv.weight": HFTensor((p + "attn.c_attn.weight",), qkv, transposed=True),
            ATTENTION + "linear_qkv.bias": HFTensor((p + "attn.c_attn.bias",), qkv),
            ATTENTION + "linear_proj.weight": HFTensor((p + "attn.c_proj.weight",), h, transposed=True),
            ATTENTION + "linear_proj.bias": HFTensor((p + "attn.c_proj.bias",), h),
            MLP + "linear_fc1.layer_norm_weight": HFTensor((p + "ln_2.weight",), h),
            MLP + "linear_fc1.layer_norm_bias": HFTensor((p + "ln_2.bias",), h),
            MLP + "linear_fc1.weight": HFTensor((p + "mlp.c_fc.weight",), ffn, transposed=True),
            MLP + "linear_fc1.bias": HFTensor((p + "mlp.c_fc.bias",), ffn),
            MLP + "linear_fc2.weight": HFTensor((p + "mlp.c_proj.weight",), h, transposed=True),
            MLP + "linear_fc2.bias": HFTensor((p + "mlp.c_proj.bias",), h),
            "decoder.final_layernorm.weight": HFTensor(("transformer.ln_f.weight",), h),
            "decoder.final_layernorm.bias": HFTensor(("transformer.ln_f.bias",), h),
        }

    def config_from_spec(self, s: ModelSpec, model_type: str) -> dict:
        return dict(model_type=model_type, n_embd=s.hidden_size, n_layer=s.num_layers, n_head=s.num_attention_heads,
                    n_inner=s.ffn_hidden_size, n_positions=s.max_position_embeddings, vocab_size=s.vocab_size,
                    layer_norm_epsilon=s.norm_epsilon, activation_function="gelu_new" if s.openai_gelu else "gelu",
                    tie_word_embeddings=True)

    def exports_as(self, s: ModelSpec) -> Optional[str]:
        learned = s.position_embedding_type == "learned_absolute" and s.normalization == "LayerNorm"
        return "gpt2" if learned and s.tied and not s.relu and not s.swiglu else None
