"""Qwen2-MoE and Qwen3-MoE: Qwen2's attention (q/k/v biases) or Qwen3's (per-head q/k norms), every MLP a
mixture of experts (``mlp.gate`` router, experts of gate/up/down projections); Qwen2-MoE adds a shared
expert whose output is scaled by sigmoid(``shared_expert_gate`` . x), megatron-core's gated shared
expert. Without ``norm_topk_prob`` the top-k weights are the softmax over every expert, not
renormalized: megatron-core's pre-softmax routing.
"""

from __future__ import annotations

from typing import Optional

from megaclone.formats.hf.configs import mixture_args, mixture_config, require
from megaclone.formats.hf.llama import Llama
from megaclone.formats.hf.mapping import HFTensor, concat, identity, mixture_tensors, without_dense_mlp
from megaclone.formats.hf.registry import register
from megaclone.shape.layout import MLP, SHARED
from megaclone.shape.spec import ModelSpec


@register
class QwenMoe(Llama):
    name = "qwen_moe"
    model_types = {"qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
    experts = True

    def args_from_config(self, c: dict) -> dict:
        qwen2 = c["model_type"] == "qwen2_moe"
        dense = {**c, "intermediate_size": c["moe_intermediate_size"],
                 "model_type": ("qwen2" if c.get("qkv_bias", True) else "llama") if qwen2 else "qwen3"}
        out = dict(super().args_from_config(dense), **mixture_args(c, "num_experts", "moe_intermediate_size",
                                                                   norm_topk_default=False))
        if qwen2:
            shared = c.get("shared_expert_intermediate_size")
            require(c, bool(shared), "no shared expert", "Qwen2-MoE models have one (shared_expert_intermediate_size)")
            out.update(moe_shared_expert_intermediate_size=shared, moe_shared_expert_gate=True)
        return out

    def layout(self, s: ModelSpec) -> dict[str, HFTensor]:
        p = "model.layers.{i}."
        out = without_dense_mlp(super().layout(s))
        out.update(mixture_tensors(MLP, "mlp.gate.weight", "mlp.experts",
                                   ("gate_proj.weight", "up_proj.weight", "down_proj.weight"), s, p))
        if s.experts.shared_ffn_hidden_size:
            shared = p + "mlp.shared_expert."
            out[SHARED + "linear_fc1.weight"] = HFTensor((shared + "gate_proj.weight", shared + "up_proj.weight"),
                                                         concat(s.experts.shared_ffn_hidden_size))
            out[SHARED + "linear_fc2.weight"] = HFTensor((shared + "down_proj.weight",), identity(s.hidden_size))
            out[SHARED + "gate_weight"] = HFTensor((p + "mlp.shared_expert_gate.weight",), identity(1))
        return out

    def config_from_spec(self, s: ModelSpec, model_type: str) -> dict:
        out = dict(super().config_from_spec(s, model_type), **mixture_config(s, "num_experts", "moe_intermediate_size"),
                   decoder_sparse_step=1, mlp_only_layers=[], intermediate_size=s.ffn_hidden_size)
        if model_type == "qwen2_moe":
            out.update(qkv_bias=s.add_qkv_bias, shared_expert_intermediate_size=s.experts.shared_ffn_hidden_size)
        return out

    def cannot_hold(self, s: ModelSpec) -> Optional[str]:
        if s.experts and s.experts.shared_ffn_hidden_size and not s.experts.shared_gate:
            return "an ungated shared expert (Qwen2-MoE gates its shared expert)"
        return super().cannot_hold(s)

    def exports_as(self, s: ModelSpec) -> Optional[str]:
        return None  # a Megatron mixture exports with --model-type
