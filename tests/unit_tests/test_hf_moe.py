"""The Hugging Face mixture-of-experts families, each a tiny model of transformers' own class with every
weight perturbed: grown 2x Hugging Face to Hugging Face (all four), into Megatron and out again
(Mixtral, Qwen3-MoE, Qwen2-MoE with its gated shared expert; OLMoE's whole-projection q/k norms keep it
out of megatron-core), each destination's logits computed by transformers (or megatron-core) against
transformers' logits of the source. In this process (a world of one)."""

import pytest
import torch

from megaclone.check.logits import verify, verify_hf
from megaclone.errors import MegacloneError
from megaclone.export import export_hf
from megaclone.formats import Format
from megaclone.pipeline.expand import expand
from megaclone.pipeline.to_hf import expand_to_hf
from megaclone.shape.request import Depth, Factors

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              num_experts_per_tok=2, max_position_embeddings=64)


def _config(family: str):
    import transformers

    return {
        "mixtral": lambda: transformers.MixtralConfig(intermediate_size=24, num_local_experts=4, **COMMON),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(intermediate_size=40, moe_intermediate_size=24, num_experts=4,
                                                         head_dim=16, norm_topk_prob=True, **COMMON),
        "qwen2_moe": lambda: transformers.Qwen2MoeConfig(intermediate_size=40, moe_intermediate_size=24, num_experts=4,
                                                         shared_expert_intermediate_size=32, **COMMON),
        "olmoe": lambda: transformers.OlmoeConfig(intermediate_size=24, num_experts=4, **COMMON),
    }[family]()


@pytest.fixture(scope="module")
def world():
    from megaclone.runtime import init_distributed

    init_distributed("cpu")


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe", "qwen2_moe", "olmoe"])
def source(world, request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(request.param))
    with torch.no_grad():
        for p in model.parameters():  # every weight, norms and routers included, away from its init
            p.add_(torch.randn_like(p) * 0.1)
    root = tmp_path_factory.mktemp(request.param) / "src"
    model.save_pretrained(root)
    return request.param, root


@pytest.mark.parametrize("depth", [Depth(), Depth(2)], ids=["width", "width-and-depth"])
def test_hugging_face_to_hugging_face(source, tmp_path, depth):
    family, src = source
    expand_to_hf(src, tmp_path / "wide", Factors.uniform(2), depth=depth)
    [r] = verify_hf(src, tmp_path / "wide")
    assert r.ok and r.max_rel < 1e-5, r.line()


def test_into_megatron_and_out_again(source, tmp_path):
    family, src = source
    if family == "olmoe":
        with pytest.raises(MegacloneError, match="q and k normalized over the whole projection|megatron-core"):
            expand(src, tmp_path / "mcore", Factors.uniform(2), 1, load_format=Format.HF)
        return
    expand(src, tmp_path / "mcore", Factors.uniform(2), 1, load_format=Format.HF)
    [r] = verify(None, tmp_path / "mcore", src_hf=src)  # megatron-core's MoE against transformers
    assert r.ok and r.max_rel < 1e-5, r.line()
    export_hf(tmp_path / "mcore", tmp_path / "back", family)
    [r] = verify_hf(src, tmp_path / "back")
    assert r.ok and r.max_rel < 1e-5, r.line()


def test_a_mixture_does_not_export_as_a_dense_family(source, tmp_path):
    family, src = source
    if family == "olmoe":
        return
    expand(src, tmp_path / "mcore", Factors.uniform(1), 1, load_format=Format.HF)
    with pytest.raises(MegacloneError, match="is a mixture of 4 experts, but transformers' llama is dense"):
        export_hf(tmp_path / "mcore", tmp_path / "llama", "llama")
