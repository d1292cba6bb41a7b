"""config.json fields several families share (transformers 4 and 5 spellings), and the refusal helper."""

from __future__ import annotations

from megaclone.errors import MegacloneError
from megaclone.shape.spec import ModelSpec


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
