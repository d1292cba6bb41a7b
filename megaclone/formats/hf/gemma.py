"""Gemma: Llama's tensor layout, with input embeddings multiplied by sqrt(hidden_size), norms that scale
by (1 + weight) and a gated GeLU MLP. Megatron-core's GPTModel computes neither of the first two, so
Gemma grows Hugging Face to Hugging Face only.

Growing the hidden size by n would grow the embedding multiplier by sqrt(n): the clone divides the
embedding table by sqrt(n), as the authors' code does. The tied output layer reads that table, so the
final norm carries the remaining 1/sqrt(n), on its (1 + weight) (docs/hf.md, "Gemma").
"""

from __future__ import annotations

from megaclone.formats.hf.configs import require, rope_model_config, rotary_gated_shape
from megaclone.formats.hf.llama import Llama
from megaclone.formats.hf.registry import register
from megaclone.shape.spec import ModelSpec


@register
class Gemma(Llama):
    name = "gemma"
    model_types = {"gemma": "GemmaForCausalLM"}
    grouped_query = True
    features = frozenset({"scaled_embedding", "zero_centered_norms"})
    activation_key = "hidden_act"

    def args_from_config(self, c: dict) -> dict:
        require(c, not c.get("attention_bias"), "attention_bias=True", "Gemma models without attention biases only")
        # gated [gate; up] as swiglu: GeLU, not SiLU, but the activation does not enter the clone
        return dict(rotary_gated_shape(c, 1e-6), hf_scaled_embedding=True, hf_zero_centered_norms=True,
                    untie_embeddings_and_output_weights=not c.get("tie_word_embeddings", True))

    def config_from_spec(self, s: ModelSpec, model_type: str) -> dict:
        return dict(rope_model_config(s, model_type), num_key_value_heads=s.num_query_groups, head_dim=s.kv_channels,
                    rms_norm_eps=s.norm_epsilon, attention_bias=False, **{self.activation_key: "gelu_pytorch_tanh"})

    def exports_as(self, s: ModelSpec):
        return None  # no Megatron model is a Gemma
