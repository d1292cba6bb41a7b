"""OPT (pre-norm sizes only): learned positions offset by 2 rows, LayerNorm, ReLU, biases.
"""

from __future__ import annotations

from typing import Optional

from megaclone.formats.hf.configs import require
from megaclone.formats.hf.mapping import HFTensor, grouped_qkv, identity, offset
from megaclone.formats.hf.registry import Family, register
from megaclone.shape.layout import ATTENTION, MLP
from megaclone.shape.spec import ModelSpec

OPT_POSITION_OFFSET = 2  # transformers' OPTLearnedPositionalEmbedding: position p is row p + 2


@register
class OPT(Family):
    name = "opt"
    model_types = {"opt": "OPTForCausalLM"}

    def args_from_config(self, c: dict) -> dict:
        require(c, c.get("do_layer_norm_before", True) and not c.get("_remove_final_layer_norm", False),
                 "do_layer_norm_before=False (post-layernorm, as OPT-350M)",
                 "megatron-core's GPTModel is pre-norm: only OPT models with do_layer_norm_before=True convert")
        h = c["hidden_size"]
        require(c, c.get("word_embed_proj_dim", h) == h, f"word_embed_proj_dim {c.get('word_embed_proj_dim')} != "
                 f"hidden_size {h} (project_in/project_out, as OPT-350M)", "megatron-core's embedding has no projection")
        require(c, c.get("activation_function", "relu") == "relu", f"activation {c.get('activation_function')!r}",
                 "ReLU only")
        require(c, c.get("enable_bias", True) and c.get("layer_norm_elementwise_affine", True),
                 "enable_bias=False or layer_norm_elementwise_affine=False", "OPT with biases and affine norms only")
        heads = c["num_attention_heads"]
        return dict(num_layers=c["num_hidden_layers"], hidden_size=h, num_attention_heads=heads, num_query_groups=heads,
                    group_query_attention=False, kv_channels=h // heads, ffn_hidden_size=c["ffn_dim"],
                    max_position_embeddings=c["max_position_embeddings"], position_embedding_type="learned_absolute",
                    swiglu=False, relu=True, normalization="LayerNorm", norm_epsilon=1e-5, add_bias_linear=True,
                    add_qkv_bias=False, untie_embeddings_and_output_weights=not c.get("tie_word_embeddings", True))



    def layout(self, s: ModelSpec) -> dict[str, HFTensor]:
        p = "model.decoder.layers.{i}."
        qkv = grouped_qkv(s.num_attention_heads, s.num_query_groups, s.kv_channels)
        h, ffn = identity(s.hidden_size), identity(s.ffn_hidden_size)
        out = {
            "embedding.word_embeddings.weight": HFTensor(("model.decoder.embed_tokens.weight",), identity(s.vocab_size)),
            "embedding.position_embeddings.weight": HFTensor(("model.decoder.embed_positions.weight",),
                                                             offset(s.max_position_embeddings, OPT_POSITION_OFFSET)),
            "decoder.final_layernorm.weight": HFTensor(("model.decoder.final_layer_norm.weight",), h),
            "decoder.final_layernorm.bias": HFTensor(("model.decoder.final_layer_norm.bias",), h),
        }
        for name in ("weight", "bias"):
            out.update({
                ATTENTION + f"linear_qkv.layer_norm_{name}": HFTensor((p + f"self_attn_layer_norm.{name}",), h),
                ATTENTION + f"linear_qkv.{name}": HFTensor(tuple(p + f"self_attn.{x}_proj.{name}" for x in "qkv"), qkv),
                ATTENTION + f"linear_proj.{name}": HFTensor((p + f"self_attn.out_proj.{name}",), h),
                MLP + f"linear_fc1.layer_norm_{name}": HFTensor((p + f"final_layer_norm.{name}",), h),
                MLP + f"linear_fc1.{name}": HFTensor((p + f"fc1.{name}",), ffn),
                MLP + f"linear_fc2.{name}": HFTensor((p + f"fc2.{name}",), h),
            })
        if not s.tied:
            out["output_layer.weight"] = HFTensor(("lm_head.weight",), identity(s.vocab_size))
        return out

    def config_from_spec(self, s: ModelSpec, model_type: str) -> dict:
        return dict(model_type=model_type, hidden_size=s.hidden_size, word_embed_proj_dim=s.hidden_size,
                    ffn_dim=s.ffn_hidden_size, num_hidden_layers=s.num_layers, num_attention_heads=s.num_attention_heads,
                    max_position_embeddings=s.max_position_embeddings, vocab_size=s.vocab_size, do_layer_norm_before=True,
                    activation_function="relu", enable_bias=True, layer_norm_elementwise_affine=True,
                    tie_word_embeddings=s.tied)

    def exports_as(self, s: ModelSpec) -> Optional[str]:
        learned = s.position_embedding_type == "learned_absolute" and s.normalization == "LayerNorm"
        return "opt" if learned and s.relu else None
