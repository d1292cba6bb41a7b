"""config.json fields several families share (transformers 4 and 5 spellings), and the refusal helper."""

from __future__ import annotations

from megaclone.errors import MegacloneError
from megaclone.shape.spec import ModelSpec, is_integer, is_number


def rope_fields(config: dict) -> tuple[float, float]:
    """(rope_theta, partial rotary factor) from transformers 4 or 5 config fields; refuses scaling."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise MegacloneError(f"rope scaling {rope_type!r} is not supported", "use a model with plain RoPE")
    theta = params.get("rope_theta", config.get("rope_theta", config.get("rotary_emb_base", 10000.0)))
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", config.get("rotary_pct", 1.0)))
    return float(theta), float(partial)


def rope_config(theta: float, partial: float) -> dict:
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        params = {"rope_type": "default", "rope_theta": theta}
        if partial != 1.0:
            params["partial_rotary_factor"] = partial
        return {"rope_parameters": params}
    return {"rope_theta": theta, "rotary_emb_base": theta, "rotary_pct": partial, "partial_rotary_factor": partial}


def require(config: dict, ok: bool, problem: str, fix: str) -> None:
    if not ok:
        raise MegacloneError(f"{config.get('model_type')}: {problem}", fix)


def rope_model_config(s: ModelSpec, model_type: str) -> dict:
    """Fields Llama-style and NeoX configs share (transformers names)."""
    return dict(model_type=model_type, hidden_size=s.hidden_size, intermediate_size=s.ffn_hidden_size,
                num_hidden_layers=s.num_layers, num_attention_heads=s.num_attention_heads,
                max_position_embeddings=s.max_position_embeddings, tie_word_embeddings=s.tied,
                vocab_size=s.vocab_size, **rope_config(s.rotary_base, s.rotary_percent))


def mixture_args(config: dict, experts_field: str, ffn_field: str, norm_topk_default: bool) -> dict:
    """Megatron-LM's MoE args for a mixture-of-experts config.json (every layer sparse). transformers'
    routers take softmax over every expert, then the top-k, renormalized with ``norm_topk_prob``:
    megatron-core's default (softmax over the chosen logits) when renormalized, its pre-softmax
    otherwise."""
    require(config, config.get("decoder_sparse_step", 1) == 1 and not config.get("mlp_only_layers"),
            "dense layers among the sparse ones (decoder_sparse_step, mlp_only_layers)",
            "a model whose every layer is a mixture of experts")
    require(config, not config.get("router_jitter_noise"), "router_jitter_noise", "a router without input jitter")
    f = config[ffn_field]
    # transformers 5 saves some families' expert count as num_local_experts, older configs as num_experts
    experts = config.get(experts_field) or config.get("num_local_experts") or config[experts_field]
    return dict(num_experts=experts, moe_router_topk=config["num_experts_per_tok"], ffn_hidden_size=f,
                moe_ffn_hidden_size=f, moe_router_pre_softmax=not config.get("norm_topk_prob", norm_topk_default),
                expert_model_parallel_size=1, moe_router_score_function="softmax")


def mixture_config(s: ModelSpec, experts_field: str, ffn_field: str) -> dict:
    """config.json's MoE fields for a mixture ``s`` (every layer sparse)."""
    e = s.experts
    return {experts_field: e.num, "num_experts_per_tok": e.topk, ffn_field: e.ffn_hidden_size,
            "norm_topk_prob": not e.pre_softmax}


def rotary_gated_shape(config: dict, norm_epsilon: float) -> dict:
    """Megatron-LM args every Llama-shaped family shares (RoPE, gated MLP, RMSNorm, bias-free linears,
    grouped-query attention, ``head_dim`` apart from hidden/heads); the families add what differs."""
    heads = config["num_attention_heads"]
    groups = config.get("num_key_value_heads") or heads
    theta, partial = rope_fields(config)
    return dict(num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"], num_attention_heads=heads,
                num_query_groups=groups, group_query_attention=groups != heads,
                kv_channels=config.get("head_dim") or config["hidden_size"] // heads,
                ffn_hidden_size=config["intermediate_size"], max_position_embeddings=config["max_position_embeddings"],
                position_embedding_type="rope", rotary_base=theta, rotary_percent=partial, swiglu=True,
                normalization="RMSNorm", norm_epsilon=config.get("rms_norm_eps", norm_epsilon), add_bias_linear=False)


# config.json fields by the kind of value they must hold, across the families megaclone reads (and
# the ones transformers keeps that the clone passes through unchanged, such as soft-capping).
SIZES = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size",
         "num_key_value_heads", "max_position_embeddings", "head_dim", "n_embd", "n_head", "n_layer", "n_positions",
         "n_inner", "ffn_dim", "word_embed_proj_dim", "num_experts", "num_local_experts", "num_experts_per_tok",
         "moe_intermediate_size", "shared_expert_intermediate_size", "query_pre_attn_scalar", "decoder_sparse_step")
COUNTS = ("sliding_window",)  # integers where 0 means none
EPSILONS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon")
POSITIVE_NUMBERS = ("rope_theta", "rotary_emb_base", "final_logit_softcapping", "attn_logit_softcapping", "clip_qkv")
FRACTIONS = ("rotary_pct", "partial_rotary_factor", "attention_dropout", "hidden_dropout", "resid_pdrop",
             "embd_pdrop", "attn_pdrop", "dropout", "activation_dropout")
FLAGS = ("tie_word_embeddings", "use_parallel_residual", "attention_bias", "mlp_bias", "do_layer_norm_before",
         "enable_bias", "layer_norm_elementwise_affine", "scale_attn_by_inverse_layer_idx", "norm_topk_prob",
         "use_qk_norm", "_remove_final_layer_norm")
REQUIRED_ANY = (("hidden_size", "n_embd"), ("num_attention_heads", "n_head"), ("num_hidden_layers", "n_layer"),
                ("vocab_size",))


def check_config(config: object, path: str) -> dict:
    """Refuse a config.json whose fields would be used with the wrong type, out of range or not finite
    (one ``error:``/``fix:`` per problem, before any of them is used): sizes are positive integers,
    epsilons positive and finite, RoPE bases and soft-capping positive and finite, fractions in [0, 1],
    flags true or false. Fields absent (or null, where transformers allows it) are the families' business."""
    import math

    def refuse(field: str, value: object, must: str) -> None:
        raise MegacloneError(f"{path}: {field} is {json_text(value)}, but it must be {must}",
                             f"correct {field} in config.json (the model's own value from where it was trained)")

    if not isinstance(config, dict):
        raise MegacloneError(f"{path} holds a JSON {type(config).__name__}, not an object of fields",
                             "point at a save_pretrained directory, whose config.json is one JSON object")
    for names in REQUIRED_ANY:
        if not any(config.get(n) is not None for n in names):
            raise MegacloneError(f"{path} lacks {' or '.join(names)}",
                                 "save the model again with save_pretrained (its config.json names every size)")
    for field, value in config.items():
        if value is None:
            continue
        number = is_number(value)
        if field in SIZES and not (is_integer(value) and value >= 1):
            refuse(field, value, "a positive integer")
        elif field in COUNTS and not (is_integer(value) and value >= 0):
            refuse(field, value, "a non-negative integer")
        elif field in EPSILONS and not (number and math.isfinite(value) and value > 0):
            refuse(field, value, "a positive finite number")
        elif field in POSITIVE_NUMBERS and not (number and math.isfinite(value) and value > 0):
            refuse(field, value, "a positive finite number (or null)")
        elif field in FRACTIONS and not (number and 0 <= value <= 1):
            refuse(field, value, "a number from 0 to 1")
        elif field in FLAGS and not isinstance(value, bool):
            refuse(field, value, "true or false")
    return config


def json_text(value: object) -> str:
    import json

    text = json.dumps(value) if not isinstance(value, float) or value == value else "NaN"
    return text if len(text) <= 60 else text[:57] + "..."
