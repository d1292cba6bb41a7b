"""Source shapes by name, for the bundled default, the benchmarks and the tests (no torch: the tools
list them in ``--help`` and refuse an unknown one before anything heavy loads)."""

from __future__ import annotations

from megaclone.shape.spec import Experts, ModelSpec, pad_vocab

# Llama family: GQA, SwiGLU, RMSNorm, RoPE, untied embeddings, no biases.
LLAMA = dict(position_embedding_type="rope", swiglu=True, normalization="RMSNorm", add_bias_linear=False,
             add_qkv_bias=False, untie_embeddings_and_output_weights=True)
# GPT-2 family: MHA, GeLU, LayerNorm, learned positions, tied embeddings, biases.
GPT2 = dict(position_embedding_type="learned_absolute", swiglu=False, normalization="LayerNorm",
            add_bias_linear=True, add_qkv_bias=False, untie_embeddings_and_output_weights=False)

PRESETS: dict[str, dict] = {
    # The bundled default: divisible for TP 8 at factor 2 (heads 8->16, groups 4->8).
    "default": dict(LLAMA, num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4,
                    kv_channels=32, ffn_hidden_size=688),
    # The benchmark's ~94M-parameter source (issue 6's reference shape).
    "bench": dict(LLAMA, num_layers=8, hidden_size=1024, num_attention_heads=16, num_query_groups=8,
                  kv_channels=64, ffn_hidden_size=2816),
    # Llama-3.2-1B's shape (tied embeddings; pass --vocab-size 128256): ~1.24B parameters.
    "llama-1b": dict(LLAMA, untie_embeddings_and_output_weights=False, num_layers=16, hidden_size=2048,
                     num_attention_heads=32, num_query_groups=8, kv_channels=64, ffn_hidden_size=8192),
    # A Qwen3-30B-A3B-like mixture layer (the MoE benchmark): 32 heads of 128 in 4 query groups over hidden
    # 2048, per-head q/k norms, 128 experts of FFN 768, top-8 (pass --num-layers for more than one).
    "qwen3-moe-layer": dict(LLAMA, num_layers=1, hidden_size=2048, num_attention_heads=32, num_query_groups=4,
                            kv_channels=128, ffn_hidden_size=768, qk_layernorm=True,
                            experts=Experts(128, 8, ffn_hidden_size=768)),
    # Test sizes. Attention width (16 x 8) differs from hidden (64) so kv_channels is exercised;
    # factor 3 still divides by TP 8 in both.
    "llama": dict(LLAMA, num_layers=2, hidden_size=64, num_attention_heads=16, num_query_groups=8,
                  kv_channels=8, ffn_hidden_size=96),
    "gpt2": dict(GPT2, num_layers=2, hidden_size=48, num_attention_heads=8, num_query_groups=8,
                 kv_channels=6, ffn_hidden_size=192),
}


def preset_spec(name: str, tp: int, vocab_size: int = 300, seq_length: int = 64,
                make_vocab_size_divisible_by: int = 16, **overrides) -> ModelSpec:
    fields = dict(PRESETS[name], **overrides)
    return ModelSpec(
        vocab_size=vocab_size,
        padded_vocab_size=pad_vocab(vocab_size, make_vocab_size_divisible_by, tp),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        tensor_parallel=tp,
        max_position_embeddings=seq_length,
        **fields,
    )
