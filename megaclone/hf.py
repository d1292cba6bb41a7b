"""Hugging Face checkpoints as sources and destinations: one layout table per model family.

Each Megatron tensor (torch_dist key) is described by where its rows live in the Hugging Face files:
one or more HF tensors, a row map (Megatron row -> HF part and row; -1 for vocabulary padding), and
whether HF stores it transposed (GPT-2's Conv1D keeps [in, out]). A reader turns any box of a
Megatron tensor into safetensors ``get_slice`` reads of just those rows and columns; an exporter runs
the same maps backwards. The Megatron side is fixed by megatron-core's GPTModel: fused QKV is
[group x (its query heads, one key, one value) x head_dim], SwiGLU fc1 is [gate; up].
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

from .errors import MegacloneError, reading
from .layout import ATTENTION, LAYERS, MLP
from .plan import Box, keyed_runs
from .spec import ModelSpec, pad_vocab

RowMap = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # Megatron rows -> (part, HF row)

DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}  # safetensors -> torch
# (names, not torch dtypes: this module imports without torch, so the tools' --help lists its families)


@dataclass(frozen=True)
class HFTensor:
    """Where one Megatron tensor's rows live: HF tensor names (``{i}`` = layer), a row map, layout.
    With ``constant`` the HF model has no such tensor (OLMo's non-parametric norms): every value is
    that constant on import, and export refuses a model whose values differ from it."""

    names: tuple[str, ...]
    row_map: RowMap
    transposed: bool = False
    constant: Optional[float] = None

    def __post_init__(self):
        if (self.constant is None) == (not self.names):
            raise ValueError("an HF tensor has names, or is a constant with none")


def constant(value: float) -> HFTensor:
    return HFTensor((), identity(0), constant=value)


# ---------------------------------------------------------------- row maps


def identity(size: int) -> RowMap:
    """Row r is HF row r; rows past ``size`` (vocabulary padding) have no source."""
    return lambda r: (np.where(r < size, 0, -1), np.where(r < size, r, 0))


def concat(size: int) -> RowMap:
    """Equal parts stacked: [part 0; part 1; ...] (SwiGLU fc1 = [gate; up])."""
    return lambda r: np.divmod(r, size)


def grouped_qkv(heads: int, groups: int, head_dim: int) -> RowMap:
    """Megatron's fused QKV rows -> (0 = query, 1 = key, 2 = value; row in that HF tensor)."""
    per_group = heads // groups
    rows_per_group = (per_group + 2) * head_dim

    def f(r: np.ndarray):
        g, within = np.divmod(r, rows_per_group)
        head, e = np.divmod(within, head_dim)
        part = np.where(head < per_group, 0, np.where(head == per_group, 1, 2))
        row = np.where(part == 0, (g * per_group + head) * head_dim + e, g * head_dim + e)
        return part, row

    return f


def offset(size: int, first: int) -> RowMap:
    """Row r is HF row r + first (OPT's learned positions keep ``first`` = 2 unused rows in front)."""
    return lambda r: (np.where(r < size, 0, -1), np.where(r < size, r + first, 0))


def merged(row_map: RowMap, sizes: Sequence[int]) -> RowMap:
    """Parts laid end to end in one HF tensor (GPT-2's c_attn holds [q_all, k_all, v_all])."""
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])

    def f(r: np.ndarray):
        part, row = row_map(r)
        return np.zeros_like(part), offsets[part] + row

    return f


# ---------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    name: str
    model_types: dict[str, str]  # HF model_type -> its transformers class (config.json's architectures)
    args_from_config: Callable[[dict], dict]
    layout: Callable[[ModelSpec], dict[str, HFTensor]]
    config_from_spec: Callable[[ModelSpec, str], dict]
    grouped_query: bool = False  # transformers' model has key/value heads apart from query heads


def _rope(config: dict) -> tuple[float, float]:
    """(rope_theta, partial rotary factor) from transformers 4 or 5 config fields; refuses scaling."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise MegacloneError(f"rope scaling {rope_type!r} is not supported", "use a model with plain RoPE")
    theta = params.get("rope_theta", config.get("rope_theta", config.get("rotary_emb_base", 10000.0)))
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", config.get("rotary_pct", 1.0)))
    return float(theta), float(partial)


def _rope_config(theta: float, partial: float) -> dict:
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        params = {"rope_type": "default", "rope_theta": theta}
        if partial != 1.0:
            params["partial_rotary_factor"] = partial
        return {"rope_parameters": params}
    return {"rope_theta": theta, "rotary_emb_base": theta, "rotary_pct": partial, "partial_rotary_factor": partial}


def _require(config: dict, ok: bool, problem: str, fix: str) -> None:
    if not ok:
        raise MegacloneError(f"{config.get('model_type')}: {problem}", fix)


def _olmo_args(c: dict) -> dict:
    _require(c, c.get("clip_qkv") is None, f"clip_qkv={c.get('clip_qkv')}", "megatron-core does not clamp q/k/v: "
             "only OLMo models without clip_qkv convert")
    args = _llama_args(c)
    # OLMo's LayerNorm has no weight or bias: a megatron-core LayerNorm with weight 1 and bias 0 (trainable)
    return dict(args, normalization="LayerNorm", norm_epsilon=1e-5)


def _olmo_layout(s: ModelSpec) -> dict[str, HFTensor]:
    out = _llama_layout(s)
    for key in (ATTENTION + "linear_qkv.layer_norm_", MLP + "linear_fc1.layer_norm_", "decoder.final_layernorm."):
        out[key + "weight"], out[key + "bias"] = constant(1.0), constant(0.0)
    return out


def _olmo_config(s: ModelSpec, model_type: str) -> dict:
    return dict(_llama_config(s, model_type), clip_qkv=None)


def _llama_args(c: dict) -> dict:
    _require(c, c.get("hidden_act", "silu") == "silu", f"hidden_act {c.get('hidden_act')!r}", "only SiLU (SwiGLU) MLPs")
    _require(c, not c.get("mlp_bias") and not c.get("attention_bias"), "attention_bias/mlp_bias on all linears",
             "only bias-free linears (Qwen2's q/k/v bias is supported)")
    heads = c["num_attention_heads"]
    groups = c.get("num_key_value_heads") or heads
    theta, partial = _rope(c)
    return dict(num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"], num_attention_heads=heads,
                num_query_groups=groups, group_query_attention=groups != heads,
                kv_channels=c.get("head_dim") or c["hidden_size"] // heads, ffn_hidden_size=c["intermediate_size"],
                max_position_embeddings=c["max_position_embeddings"], position_embedding_type="rope",
                rotary_base=theta, rotary_percent=partial, swiglu=True, normalization="RMSNorm",
                norm_epsilon=c.get("rms_norm_eps", 1e-6), add_bias_linear=False,
                add_qkv_bias=c["model_type"] == "qwen2", qk_layernorm=c["model_type"] == "qwen3",
                untie_embeddings_and_output_weights=not c.get("tie_word_embeddings", False))


def _llama_layout(s: ModelSpec) -> dict[str, HFTensor]:
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


def _rope_model_config(s: ModelSpec, model_type: str) -> dict:
    """Fields Llama-style and NeoX configs share (transformers names)."""
    return dict(model_type=model_type, hidden_size=s.hidden_size, intermediate_size=s.ffn_hidden_size,
                num_hidden_layers=s.num_layers, num_attention_heads=s.num_attention_heads,
                max_position_embeddings=s.max_position_embeddings, tie_word_embeddings=s.tied,
                vocab_size=s.vocab_size, **_rope_config(s.rotary_base, s.rotary_percent))


def _llama_config(s: ModelSpec, model_type: str) -> dict:
    return dict(_rope_model_config(s, model_type), num_key_value_heads=s.num_query_groups, head_dim=s.kv_channels,
                hidden_act="silu", rms_norm_eps=s.norm_epsilon, attention_bias=False, mlp_bias=False)


def _gpt2_args(c: dict) -> dict:
    act = c.get("activation_function", "gelu_new")
    _require(c, act in ("gelu_new", "gelu_pytorch_tanh", "gelu"), f"activation {act!r}", "GeLU (tanh or exact) only")
    _require(c, not c.get("scale_attn_by_inverse_layer_idx"), "scale_attn_by_inverse_layer_idx",
             "megatron-core scales attention by 1/sqrt(head_dim) only")
    h, heads = c["n_embd"], c["n_head"]
    return dict(num_layers=c["n_layer"], hidden_size=h, num_attention_heads=heads, num_query_groups=heads,
                group_query_attention=False, kv_channels=h // heads, ffn_hidden_size=c.get("n_inner") or 4 * h,
                max_position_embeddings=c["n_positions"], position_embedding_type="learned_absolute",
                swiglu=False, openai_gelu=act != "gelu", normalization="LayerNorm",
                norm_epsilon=c.get("layer_norm_epsilon", 1e-5), add_bias_linear=True, add_qkv_bias=False,
                untie_embeddings_and_output_weights=False)


def _gpt2_layout(s: ModelSpec) -> dict[str, HFTensor]:
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


def _gpt2_config(s: ModelSpec, model_type: str) -> dict:
    return dict(model_type=model_type, n_embd=s.hidden_size, n_layer=s.num_layers, n_head=s.num_attention_heads,
                n_inner=s.ffn_hidden_size, n_positions=s.max_position_embeddings, vocab_size=s.vocab_size,
                layer_norm_epsilon=s.norm_epsilon, activation_function="gelu_new" if s.openai_gelu else "gelu",
                tie_word_embeddings=True)


def _opt_args(c: dict) -> dict:
    _require(c, c.get("do_layer_norm_before", True) and not c.get("_remove_final_layer_norm", False),
             "do_layer_norm_before=False (post-layernorm, as OPT-350M)",
             "megatron-core's GPTModel is pre-norm: only OPT models with do_layer_norm_before=True convert")
    h = c["hidden_size"]
    _require(c, c.get("word_embed_proj_dim", h) == h, f"word_embed_proj_dim {c.get('word_embed_proj_dim')} != "
             f"hidden_size {h} (project_in/project_out, as OPT-350M)", "megatron-core's embedding has no projection")
    _require(c, c.get("activation_function", "relu") == "relu", f"activation {c.get('activation_function')!r}",
             "ReLU only")
    _require(c, c.get("enable_bias", True) and c.get("layer_norm_elementwise_affine", True),
             "enable_bias=False or layer_norm_elementwise_affine=False", "OPT with biases and affine norms only")
    heads = c["num_attention_heads"]
    return dict(num_layers=c["num_hidden_layers"], hidden_size=h, num_attention_heads=heads, num_query_groups=heads,
                group_query_attention=False, kv_channels=h // heads, ffn_hidden_size=c["ffn_dim"],
                max_position_embeddings=c["max_position_embeddings"], position_embedding_type="learned_absolute",
                swiglu=False, relu=True, normalization="LayerNorm", norm_epsilon=1e-5, add_bias_linear=True,
                add_qkv_bias=False, untie_embeddings_and_output_weights=not c.get("tie_word_embeddings", True))


OPT_POSITION_OFFSET = 2  # transformers' OPTLearnedPositionalEmbedding: position p is row p + 2


def _opt_layout(s: ModelSpec) -> dict[str, HFTensor]:
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


def _opt_config(s: ModelSpec, model_type: str) -> dict:
    return dict(model_type=model_type, hidden_size=s.hidden_size, word_embed_proj_dim=s.hidden_size,
                ffn_dim=s.ffn_hidden_size, num_hidden_layers=s.num_layers, num_attention_heads=s.num_attention_heads,
                max_position_embeddings=s.max_position_embeddings, vocab_size=s.vocab_size, do_layer_norm_before=True,
                activation_function="relu", enable_bias=True, layer_norm_elementwise_affine=True,
                tie_word_embeddings=s.tied)


def _neox_args(c: dict) -> dict:
    _require(c, not c.get("use_parallel_residual", True), "use_parallel_residual=True (attention and MLP in parallel)",
             "megatron-core's GPTModel is sequential; only GPT-NeoX models with use_parallel_residual=False convert")
    _require(c, c.get("hidden_act", "gelu") == "gelu", f"hidden_act {c.get('hidden_act')!r}", "exact GeLU only")
    _require(c, c.get("attention_bias", True), "attention_bias=False", "GPT-NeoX with biases only")
    heads = c["num_attention_heads"]
    theta, partial = _rope(c)
    return dict(num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"], num_attention_heads=heads,
                num_query_groups=heads, group_query_attention=False, kv_channels=c["hidden_size"] // heads,
                ffn_hidden_size=c["intermediate_size"], max_position_embeddings=c["max_position_embeddings"],
                position_embedding_type="rope", rotary_base=theta, rotary_percent=partial, swiglu=False,
                normalization="LayerNorm", norm_epsilon=c.get("layer_norm_eps", 1e-5), add_bias_linear=True,
                add_qkv_bias=False, untie_embeddings_and_output_weights=not c.get("tie_word_embeddings", False))


def _neox_layout(s: ModelSpec) -> dict[str, HFTensor]:
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


def _neox_config(s: ModelSpec, model_type: str) -> dict:
    return dict(_rope_model_config(s, model_type), layer_norm_eps=s.norm_epsilon, hidden_act="gelu",
                use_parallel_residual=False, attention_bias=True)


FAMILIES = (
    Family("llama", {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                     "qwen3": "Qwen3ForCausalLM"}, _llama_args, _llama_layout, _llama_config, grouped_query=True),
    Family("gpt2", {"gpt2": "GPT2LMHeadModel"}, _gpt2_args, _gpt2_layout, _gpt2_config),
    Family("opt", {"opt": "OPTForCausalLM"}, _opt_args, _opt_layout, _opt_config),
    Family("olmo", {"olmo": "OlmoForCausalLM"}, _olmo_args, _olmo_layout, _olmo_config, grouped_query=True),
    Family("gpt_neox", {"gpt_neox": "GPTNeoXForCausalLM"}, _neox_args, _neox_layout, _neox_config),
)


def model_types() -> list[str]:
    """Every HF model_type the registry reads and writes, in registry order."""
    return [t for f in FAMILIES for t in f.model_types]


# Families whose function megatron-core's GPTModel cannot compute, with the reason.
CANNOT_EXPRESS = {
    "gemma": "Gemma multiplies the input embedding by sqrt(hidden_size) while its tied output layer uses the "
             "unscaled embedding; megatron-core's embedding has no multiplier, so no GPTModel computes it",
    "gemma2": "Gemma 2 scales its embedding by sqrt(hidden_size) (megatron-core's embedding has no multiplier), "
              "soft-caps attention scores and logits and adds norms after attention and MLP, none of which "
              "megatron-core's GPTModel does",
    "olmo2": "OLMo-2 normalizes the attention and MLP outputs before adding them to the residual stream and "
             "normalizes q and k over the whole projection; megatron-core's GPTModel is pre-norm with per-head "
             "q/k norms only",
}


def family_of(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    if model_type in CANNOT_EXPRESS:
        raise MegacloneError(f"Hugging Face model_type {model_type!r} is refused: {CANNOT_EXPRESS[model_type]}",
                             f"megaclone imports {supported}")
    raise MegacloneError(f"Hugging Face model_type {model_type!r} is not supported", f"supported: {supported}")


def infer_model_type(spec: ModelSpec) -> str:
    """The HF family a Megatron model (not imported from HF) exports as."""
    if spec.swiglu and spec.normalization == "RMSNorm" and spec.position_embedding_type == "rope" and not spec.add_bias_linear:
        return "qwen3" if spec.qk_layernorm else "qwen2" if spec.add_qkv_bias else "llama"
    if spec.position_embedding_type == "learned_absolute" and spec.normalization == "LayerNorm" and spec.relu:
        return "opt"
    if spec.position_embedding_type == "learned_absolute" and spec.normalization == "LayerNorm" and spec.tied:
        return "gpt2"
    if spec.position_embedding_type == "rope" and spec.normalization == "LayerNorm" and spec.add_bias_linear:
        return "gpt_neox"
    if spec.swiglu and spec.normalization == "LayerNorm" and spec.position_embedding_type == "rope":
        return "olmo"
    raise MegacloneError("this model matches no Hugging Face family megaclone exports (llama, qwen2, qwen3, gpt2, "
                         "opt, gpt_neox, olmo)",
                         "pass --model-type explicitly if the layout matches one of them")


# ---------------------------------------------------------------- reading


# Buffers that older transformers versions saved beside the weights (causal masks, RoPE frequencies):
# recomputed by every model, never imported.
NON_PARAMETER_BUFFERS = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias",
                         "rotary_emb.inv_freq")


class SafetensorsDir:
    """The ``*.safetensors`` files of an HF directory (single file or sharded with an index)."""

    def __init__(self, root: Path):
        self.root = root
        index = root / "model.safetensors.index.json"
        if index.exists():
            with reading(index):
                self.files = {name: root / f for name, f in json.loads(index.read_text())["weight_map"].items()}
        elif (root / "model.safetensors").exists():
            from safetensors import safe_open

            with reading(root / "model.safetensors"), safe_open(root / "model.safetensors", framework="pt") as f:
                self.files = {name: root / "model.safetensors" for name in f.keys()}
        else:
            raise MegacloneError(f"{root} holds no model.safetensors or model.safetensors.index.json",
                                 "save the model with save_pretrained(..., safe_serialization=True)")
        self._open: dict[Path, object] = {}

    def handle(self, name: str):
        from safetensors import safe_open

        if name not in self.files:
            raise MegacloneError(f"{self.root} has no tensor {name!r}", "the files do not match config.json")
        path = self.files[name]
        if path not in self._open:
            with reading(path, f"{path} (holding {name!r})"):
                self._open[path] = safe_open(str(path), framework="pt").__enter__()
        return self._open[path]

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        s = self.handle(name).get_slice(name)
        import torch

        return tuple(s.get_shape()), getattr(torch, DTYPES[s.get_dtype()])


def read_box(files: SafetensorsDir, t: HFTensor, layer: Optional[int], box: Box, dtype: torch.dtype) -> torch.Tensor:
    """One box of a Megatron tensor from the HF files, reading only the rows and columns it covers."""
    import torch

    if t.constant is not None:
        return torch.full(box.lengths, t.constant, dtype=dtype)
    rows = np.arange(box.offsets[0], box.offsets[0] + box.lengths[0])
    part, hrow = t.row_map(rows)
    names = [n.format(i=layer) for n in t.names]
    out = torch.zeros(box.lengths, dtype=dtype)
    cols = None if len(box.lengths) == 1 else slice(box.offsets[1], box.offsets[1] + box.lengths[1])
    for a, b in keyed_runs(part, hrow):
        if part[a] < 0:
            continue
        name = names[part[a]]
        sl = files.handle(name).get_slice(name)
        r = slice(int(hrow[a]), int(hrow[b - 1]) + 1)
        if cols is None:
            out[a:b] = sl[r]
        elif t.transposed:
            out[a:b] = sl[cols, r].T
        else:
            out[a:b] = sl[r, cols]
    return out


def read_config(root: Path) -> dict:
    path = root / "config.json"
    if not path.exists():
        raise MegacloneError(f"{root} has no config.json", "point --load-hf at a save_pretrained directory")
    with reading(path):
        return json.loads(path.read_text())


def read_args(root: Path, make_vocab_size_divisible_by: int = 128) -> argparse.Namespace:
    """Megatron-LM args for an HF model (TP 1), with the tokenizer it came with."""
    config = read_config(root)
    family = family_of(config.get("model_type"))
    fields = family.args_from_config(config)
    vocab = config["vocab_size"]
    args = argparse.Namespace(**fields)
    args.vocab_size = vocab
    args.padded_vocab_size = pad_vocab(vocab, make_vocab_size_divisible_by, 1)
    args.make_vocab_size_divisible_by = make_vocab_size_divisible_by
    args.tensor_model_parallel_size = 1
    args.pipeline_model_parallel_size = 1
    args.seq_length = fields["max_position_embeddings"]
    args.tokenizer_type = "HuggingFaceTokenizer"
    args.tokenizer_model = str(root.resolve())
    args.hf_model_type = config["model_type"]
    args.ckpt_format = "torch_dist"
    return args


# ---------------------------------------------------------------- writing (export)


def check_constant(t: HFTensor, key: str, layer: Optional[int], full: torch.Tensor, model_type: str) -> None:
    """Refuse to export a tensor the HF model keeps constant (has no parameter for) once it differs."""
    if t.constant is not None and not bool((full == t.constant).all()):
        where = key + ("" if layer is None else f" (layer {layer})")
        raise MegacloneError(
            f"{where} is no longer {t.constant:g} everywhere, but transformers' {model_type} has no parameter for "
            "it (a non-parametric norm): exporting would change the function",
            "keep the model in Megatron; a width-grown tied model carries 1/n in its final norm and cannot be "
            "exported to such a family")


def hf_tensors_from(t: HFTensor, layer: Optional[int], full: torch.Tensor) -> dict[str, torch.Tensor]:
    """The HF tensors one full Megatron tensor (one layer of it) holds: the row maps run backwards.
    A constant holds none (``check_constant`` first)."""
    import torch

    part, hrow = t.row_map(np.arange(full.shape[0]))
    out = {}
    for p, name in enumerate(t.names):
        sel = np.nonzero(part == p)[0]
        rows = int(hrow[sel].max()) + 1 if len(sel) else 0
        piece = full.new_zeros((rows,) + tuple(full.shape[1:]))  # rows no Megatron row maps to stay zero
        piece[torch.from_numpy(hrow[sel])] = full[torch.from_numpy(sel)]
        out[name.format(i=layer)] = (piece.T if t.transposed and piece.dim() == 2 else piece).contiguous()
    return out
