"""Families megatron-core's GPTModel does not compute grow Hugging Face to Hugging Face (--save-hf):
Pythia (GPT-NeoX's parallel residual), Gemma (sqrt(hidden)-scaled embedding, (1 + w) norms, tied),
Gemma 2 (norms on each branch's output, soft-capping, sliding windows) and OLMo-2 (no pre-norms, q/k
norms over the whole projection). Tiny models built with transformers' own classes, every weight
perturbed; the grown model, loaded by transformers, computes the small model's logits. In this
process (a world of one, gloo)."""

import pytest
import torch

pytest.importorskip("transformers")

from megaclone.errors import MegacloneError  # noqa: E402
from megaclone.pipeline.clone import CloneConfig, Variant  # noqa: E402
from megaclone.shape.request import Depth, Factors  # noqa: E402


def configs():
    import transformers as T

    small = dict(vocab_size=100, num_hidden_layers=2, max_position_embeddings=64)
    gqa = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)
    return {
        # parallel residual, RoPE over a quarter of each head, untied
        "pythia": T.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                  use_parallel_residual=True, rotary_pct=0.25, **small),
        # tied, scaled embedding, (1 + w) norms, head_dim apart from hidden/heads
        "gemma": T.GemmaConfig(head_dim=8, **gqa, **small),
        # a 4-token window: shorter than the test sequences, so each layer's attention type matters
        "gemma2": T.Gemma2Config(head_dim=8, sliding_window=4, query_pre_attn_scalar=8, **gqa, **small),
        "olmo2": T.Olmo2Config(**gqa, **small),
    }


CASES = {  # name: (factors, clone config, depth); every family runs the first three
    "symmetric": (Factors.uniform(2), CloneConfig(), Depth()),
    "unequal-factors": (Factors(2, 2, 3), CloneConfig(), Depth()),
    "depth-interleaved": (Factors.uniform(2), CloneConfig(), Depth(2, "identity", "interleave")),
    "noisy-symmetric": (Factors.uniform(2), CloneConfig(Variant.NOISY_SYMMETRIC, seed=3), Depth()),
    "diagonal": (Factors.uniform(2), CloneConfig(Variant.DIAGONAL), Depth()),
    "noisy-diagonal": (Factors.uniform(2), CloneConfig(Variant.NOISY_DIAGONAL, seed=3), Depth()),
}
# the variants act on matrices, which these families share with the others; they run where a new
# norm reads a cloned matrix's output (OLMo-2's q/k norms, Gemma 2's norms on each branch's output)
RUNS = [(f, c) for f in configs() for c in CASES if c in list(CASES)[:3] or f in ("gemma2", "olmo2")]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from megaclone.runtime import init_distributed

    init_distributed("cpu")
    root = tmp_path_factory.mktemp("hf-only")
    tokens = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(5))
    out = {}
    for i, (family, config) in enumerate(configs().items()):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():
            for p in model.parameters():  # norms and biases too: a (1 + w) norm's w is no longer 0
                p.add_(torch.randn_like(p) * 0.05)
            logits = model(tokens).logits
        model.save_pretrained(str(root / family))
        out[family] = (root / family, logits)
    return out, tokens


@pytest.mark.parametrize("family,case", RUNS)
def test_grown_model_computes_the_small_models_logits_in_transformers(sources, tmp_path, family, case):
    from transformers import AutoModelForCausalLM

    from megaclone.pipeline.to_hf import expand_to_hf

    (src, expected), tokens = sources[0][family], sources[1]
    factors, cfg, depth = CASES[case]
    expand_to_hf(src, tmp_path / "wide", factors, cfg, depth, overwrite=True)
    wide = AutoModelForCausalLM.from_pretrained(str(tmp_path / "wide")).eval()
    assert wide.config.hidden_size == 32 * factors.hidden
    assert wide.config.num_hidden_layers == 2 * depth.factor
    with torch.no_grad():
        found = wide(tokens).logits
    rel = ((found - expected).abs().max() / expected.abs().max()).item()
    assert rel <= (1e-5 if not cfg.variant.noisy else 1e-4), rel


def test_a_megatron_destination_is_refused_with_the_reason_and_the_fix(sources, tmp_path):
    """megatron-core's GPTModel would compute another function: refused before anything is written."""
    from megaclone.pipeline.expand import expand

    for family, reason in (("pythia", "a parallel residual"), ("gemma", "input embeddings scaled by sqrt"),
                           ("gemma2", "norms on the attention and MLP outputs"),
                           ("olmo2", "q and k norms over the whole projection")):
        src = sources[0][family][0]
        with pytest.raises(MegacloneError, match=reason) as err:
            expand(src, tmp_path / family, Factors.uniform(2), 1, load_format="hf")
        # refused while the source is validated (naming it), not later by the model builder's own check
        assert str(src) in str(err.value) and "--save-hf" in str(err.value) and not (tmp_path / family).exists()
