"""Options a user reaches for, each end to end in this process (a world of one, gloo) and checked
against an independent computation: megatron-core's own load of the result, or transformers."""

import importlib.util
import json
import shutil

import pytest
import torch
from util import rewrite_common

from megaclone import sample
from megaclone.check.logits import text_tokens, verify
from megaclone.errors import MegacloneError
from megaclone.formats import torch_dist
from megaclone.pipeline.expand import expand
from megaclone.shape import presets
from megaclone.shape.request import Factors


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from megaclone.runtime import init_distributed

    init_distributed("cpu")
    root = tmp_path_factory.mktemp("options") / "src"
    sample.make_source(root, presets.preset_spec("llama", 1), train_steps=2)
    return root


def test_unequal_factors_preserve_the_logits(source, tmp_path):
    for factors in (Factors(2, 1, 3), Factors(1, 2, 1), Factors(3, 2, 2)):
        dst = tmp_path / f"d{factors.hidden}{factors.heads}{factors.ffn}"
        expand(source, dst, factors, 1)
        [r] = verify(source, dst)
        assert r.ok and r.max_rel < 1e-5, (factors, r)


@pytest.mark.parametrize("variant", ["symmetric", "noisy-symmetric", "diagonal"])
def test_query_groups_may_grow_less_than_the_heads(source, tmp_path, variant):
    """--query-group-factor: the new heads join the existing groups (the authors' code keeps a
    multi-query model's single KV head); megatron-core's GQA forward of the wide model gives the
    source's logits, and the args record the groups."""
    from megaclone.pipeline.clone import CloneConfig, Variant

    mqa = tmp_path / "mqa"
    sample.make_source(mqa, presets.preset_spec("llama", 1, num_query_groups=1), train_steps=1)
    for src, factors, groups in ((source, Factors(2, 2, 2, 1), 8), (source, Factors(3, 4, 2, 2), 16),
                                 (mqa, Factors(2, 2, 2, 1), 1)):
        dst = tmp_path / f"{src.name}-{factors.heads}-{factors.groups}"
        expand(src, dst, factors, 1, CloneConfig(Variant(variant), seed=3))
        args = torch_dist.read_common(torch_dist.find_checkpoint(dst))["args"]
        assert (args.num_attention_heads, args.num_query_groups) == (16 * factors.heads, groups)
        [r] = verify(src, dst)
        assert r.ok and r.max_rel < 1e-5, (factors, r)
    if variant == "symmetric" and importlib.util.find_spec("transformers"):
        # exported with its 8 KV heads, transformers' Llama computes what megatron-core's model does
        from megaclone.export import export_hf

        export_hf(tmp_path / f"{source.name}-2-1", tmp_path / "hf")
        torch.testing.assert_close(*megatron_and_hf_logits(tmp_path / f"{source.name}-2-1", tmp_path / "hf"),
                                   rtol=1e-5, atol=1e-5)


def test_a_gpt2_with_fewer_query_groups_than_heads_is_not_exported(source, tmp_path):  # source: the process group
    """transformers' GPT-2 has no grouped-query attention: the export refuses, writing nothing."""
    pytest.importorskip("transformers")
    from megaclone.export import export_hf

    src = tmp_path / "gpt2"
    sample.make_source(src, presets.preset_spec("gpt2", 1), train_steps=1)
    wide = tmp_path / "wide"
    expand(src, wide, Factors(1, 2, 1, 1), 1)
    with pytest.raises(MegacloneError, match="has no grouped-query attention"):
        export_hf(wide, tmp_path / "hf", "gpt2")
    assert not (tmp_path / "hf").exists()


def test_a_legacy_checkpoint_exports_through_the_same_reader(source, tmp_path):
    """export reads any Megatron format through formats.Source: a clone saved in Megatron-LM's legacy
    files exports to an HF model whose logits (transformers) are megatron-core's own load of the same
    clone saved in torch_dist."""
    pytest.importorskip("transformers")
    from megaclone.export import export_hf

    twin, legacy = tmp_path / "twin", tmp_path / "legacy"
    expand(source, twin, Factors.uniform(2), 1)
    expand(source, legacy, Factors.uniform(2), 1, save_format="torch")
    assert list(legacy.glob("iter_*/mp_rank_00/model_optim_rng.pt"))
    export_hf(legacy, tmp_path / "hf", "llama")
    torch.testing.assert_close(*megatron_and_hf_logits(twin, tmp_path / "hf"), rtol=1e-5, atol=1e-5)
    # inspect reads both through the same reader: the tensors torch_dist stores, with the same digests
    from megaclone.formats.describe import describe

    stored = {line.split()[0]: line.split()[1:] for line in describe(twin, digests=True).splitlines()[1:]
              if line.split()[0].startswith(("embedding.", "decoder.", "output_layer."))}
    for text, fmt in ((describe(legacy, digests=True), "torch"), (describe(tmp_path / "hf", digests=True), "hf")):
        assert f"format {fmt}" in text.splitlines()[0]
        listed = {line.split()[0]: line.split()[1:] for line in text.splitlines()[1:] if "=" not in line}
        assert listed.keys() <= stored.keys() and "decoder.layers.self_attention.linear_qkv.weight" in listed
        if fmt == "torch":  # the legacy files hold the very tensors the torch_dist twin stores
            assert listed == {k: stored[k] for k in listed}


def test_a_query_group_factor_must_divide_the_head_factor(source, tmp_path):
    with pytest.raises(MegacloneError, match="does not divide the head factor 2"):
        expand(source, tmp_path / "d", Factors(2, 2, 2, 3), 1)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_a_half_precision_destination_from_an_fp32_source(source, tmp_path, dtype, tol):
    expand(source, tmp_path / "d", Factors.uniform(2), 1, dtype=dtype)
    args = torch_dist.read_common(torch_dist.find_checkpoint(tmp_path / "d"))["args"]
    assert (args.fp16, args.bf16) == (dtype == torch.float16, dtype == torch.bfloat16)
    [r] = verify(source, tmp_path / "d")
    assert r.tol == tol and r.ok, r


def test_vocab_size_limits_what_is_compared_and_recorded(source, tmp_path):
    expand(source, tmp_path / "d", Factors.uniform(2), 1, vocab_size=250)
    # NullTokenizer's --vocab-size counts the ids before its end-of-document id: 250 real ids -> 249
    assert torch_dist.read_common(torch_dist.find_checkpoint(tmp_path / "d"))["args"].vocab_size == 249
    [r] = verify(source, tmp_path / "d")
    assert r.ok and r.vocab_stop == 250  # ids past 250 are padding to the destination: compared as such


def test_text_tokens_feed_the_verifier(source, tmp_path):
    expand(source, tmp_path / "d", Factors.uniform(2), 1)
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x * 2\n" * 8)
    tokens = text_tokens(text, 2, 32)
    assert tokens.shape == (2, 32) and int(tokens[0, 0]) == ord("d")
    [r] = verify(source, tmp_path / "d", tokens=tokens)
    assert r.ok
    with pytest.raises(MegacloneError, match="fewer than batch x seq-length"):
        text_tokens(text, 100, 32)


def test_hf_models_megatron_core_cannot_compute_are_refused_with_the_reason(tmp_path):
    transformers = pytest.importorskip("transformers")
    from megaclone.formats.hf.reader import open_hf_source

    small = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=1, vocab_size=64)
    cases = {
        "rope scaling 'linear' is not supported": transformers.LlamaConfig(
            **small, rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "attention_bias/mlp_bias on all linears": transformers.LlamaConfig(**small, attention_bias=True),
    }
    for i, (reason, config) in enumerate(cases.items()):
        root = tmp_path / f"m{i}"
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(root))
        with pytest.raises(MegacloneError, match=reason) as info:
            open_hf_source(root)
        assert info.value.fix


def test_export_of_a_megatron_native_checkpoint_computes_its_logits_in_transformers(source, tmp_path):
    """The family is inferred from the shape (a Llama-like model), the tokenizer files named by the
    args are copied, and transformers' own model of the export gives the Megatron model's logits."""
    pytest.importorskip("transformers")
    from megaclone.export import export_hf

    src = tmp_path / "src"
    shutil.copytree(source, src)
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    rewrite_common(torch_dist.find_checkpoint(src), lambda common: setattr(common["args"], "tokenizer_model", str(tokenizer)))

    info = export_hf(src, tmp_path / "hf")
    assert info["model_type"] == "llama"
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == (tokenizer / "tokenizer.json").read_text()
    megatron, hf = megatron_and_hf_logits(src, tmp_path / "hf")
    assert hf.shape == megatron.shape
    torch.testing.assert_close(hf, megatron, rtol=1e-5, atol=1e-5)


def megatron_and_hf_logits(checkpoint, hf_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """megatron-core's own load of a checkpoint and transformers' own model of its export, on the same
    tokens, over the real vocabulary (the export drops Megatron's padding rows, as an HF vocabulary
    has none; verify_logits also compares padding rows, so it cannot judge an export)."""
    from transformers import AutoModelForCausalLM

    from megaclone.formats.torch_dist import open_torch_dist_source
    from megaclone.model import build_gpt, causal_logits, load_model
    from megaclone.runtime import init_parallel

    spec = open_torch_dist_source(checkpoint).spec
    init_parallel(1)
    model = build_gpt(spec)
    load_model(model, torch_dist.find_checkpoint(checkpoint))
    tokens = torch.randint(0, spec.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    megatron = causal_logits(model, tokens)[..., :spec.vocab_size]
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()(tokens).logits
    return megatron, hf


def test_the_public_api_grows_and_checks_a_clone(source, tmp_path):
    """megaclone's top-level names, as its docstring shows them, with no deep import."""
    import megaclone

    megaclone.grow(source, tmp_path / "wide", megaclone.Factors.uniform(2), 1,
                   megaclone.CloneConfig(megaclone.Variant.DIAGONAL))
    [logits] = megaclone.verify_logits(source, tmp_path / "wide")
    [weights] = megaclone.verify_weights(source, tmp_path / "wide")
    assert logits.ok and weights.ok and set(megaclone.__all__) >= {"grow", "grow_hf", "export_hf", "Experts"}
