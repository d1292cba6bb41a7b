"""Hugging Face import and export, checked against transformers itself (tests/hf_worker.py, 4 ranks)."""


import pytest

pytest.importorskip("transformers")

from megaclone.errors import MegacloneError  # noqa: E402
from megaclone.formats.hf.reader import open_hf_source  # noqa: E402

pytestmark = pytest.mark.slow  # torchrun jobs

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "opt", "olmo", "gpt_neox")


@pytest.fixture(scope="module")
def results(four_rank_results):
    return four_rank_results["hf"]


@pytest.mark.parametrize("family", FAMILIES)
def test_import_matches_transformers_logits(results, family):
    r = results[family]
    cases = {k: v for k, v in r.items() if k[:3] in ("f1-", "f2-")}
    assert len(cases) == (3 if family == "llama" else 2)
    bad = {k: v for k, v in cases.items() if not v <= 1e-5}
    assert not bad, bad


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip_and_grown_model_in_transformers(results, family):
    r = results[family]
    assert r["roundtrip_same_names"] and r["roundtrip_identical"] and r["roundtrip_unread_rows_zero"]
    assert r["exported_wide_rel"] <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_to_hf_in_one_pass_loads_in_transformers_with_the_small_models_logits(results, family):
    """--save-hf: every rank writes its shard, no Megatron checkpoint; the same bytes as import then
    export; width 2 alone and with depth 2 (identity, top), both equal to the small model in transformers."""
    r = results[family]
    assert r["hf2hf_files"] == 4 and r["hf2hf_equals_two_step"]
    assert r["hf2hf_rel"] <= 1e-5 and r["hf2hf-deep_rel"] <= 1e-5
    assert (r["hf2hf_layers"], r["hf2hf-deep_layers"]) == (2, 4)


def test_a_tied_olmo_grown_in_width_is_not_exported_but_verifies_in_megatron(results):
    r = results["olmo-tied"]
    assert "decoder.final_layernorm.weight is no longer 1 everywhere" in r["error"] and not r["wrote"]
    assert r["verify_rel"] <= 1e-5


def test_sharded_source_was_exercised(results):
    assert results["llama"]["files"] >= 2


def _hf_dir(tmp_path, config):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path))
    return tmp_path


def test_unsupported_hf_models_are_refused_with_a_fix(tmp_path):
    import transformers as T

    opt = dict(hidden_size=32, ffn_dim=64, num_attention_heads=4, num_hidden_layers=1, vocab_size=50)
    with pytest.raises(MegacloneError, match="post-layernorm, as OPT-350M"):
        open_hf_source(_hf_dir(tmp_path / "opt-post", T.OPTConfig(do_layer_norm_before=False, **opt)))
    with pytest.raises(MegacloneError, match="word_embed_proj_dim 16 != hidden_size 32"):
        open_hf_source(_hf_dir(tmp_path / "opt-proj", T.OPTConfig(word_embed_proj_dim=16, **opt)))
    with pytest.raises(MegacloneError, match="not supported"):
        open_hf_source(_hf_dir(tmp_path / "bloom", T.BloomConfig(hidden_size=32, n_head=4, n_layer=1, vocab_size=50)))
    with pytest.raises(MegacloneError, match="config.json"):
        open_hf_source(tmp_path)


def test_bf16_stays_bf16_and_symmetric_power_of_two_is_bit_exact(results):
    r = results["bf16"]
    assert all(r["bf16"].values()), r["bf16"]
    assert all(r["as-fp32"].values()), r["as-fp32"]  # --dtype float32: the bf16 values, widened
    assert r["verify_tol"] == 2e-2 and r["verify_rel"] <= r["verify_tol"], r


def test_hf_tensors_the_import_would_not_read_or_cannot_find_are_refused_by_name(tmp_path):
    """The key sets must match: a weight the import would drop (here a q_norm, as Qwen3 has) and a
    weight it needs are each named, before anything is read."""
    import transformers as T
    from safetensors.torch import load_file, save_file

    config = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                           num_hidden_layers=2, vocab_size=64)
    hf_dir = _hf_dir(tmp_path / "llama", config)
    tensors = load_file(hf_dir / "model.safetensors")
    open_hf_source(hf_dir)  # as saved: accepted
    extra = {**tensors, "model.layers.1.self_attn.q_norm.weight": tensors["model.norm.weight"][:8].clone()}
    save_file(extra, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MegacloneError, match="would not read: 'model.layers.1.self_attn.q_norm.weight'"):
        open_hf_source(hf_dir)
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MegacloneError, match="lacks tensors its config.json implies: 'model.layers.0.mlp.up_proj"):
        open_hf_source(hf_dir)


def test_an_imported_opt_trains_with_relu_from_the_source_loss(tmp_path):
    """Megatron-LM has no plain-ReLU flag: the written args carry megaclone's ``relu`` field and
    examples/pretrain_gpt.py trains the grown OPT with it, starting at the loss transformers' own OPT
    computes on the first batch."""
    import json
    import sys

    import torch
    import transformers as T
    from util import ROOT, run

    torch.manual_seed(2)
    T.AutoModelForCausalLM.from_config(T.OPTConfig(
        hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32, vocab_size=300,
        num_hidden_layers=2, max_position_embeddings=128)).save_pretrained(str(tmp_path / "small"))
    from megaclone.train.data import preprocess

    preprocess(tmp_path / "data", [ROOT / "megaclone"])
    for cmd in (["tools/expand_sharded.py", "--load-hf", tmp_path / "small", "--save", tmp_path / "wide", "--tp", "1",
                 "--factor", "2", "--no-progress"],
                ["examples/pretrain_gpt.py", "--load", tmp_path / "wide", "--finetune", "--use-checkpoint-args",
                 "--seq-length", "64", "--data-path", tmp_path / "data", "--split", "90,10,0", "--micro-batch-size", "4",
                 "--global-batch-size", "4", "--train-iters", "2", "--lr", "1e-3", "--eval-iters", "0",
                 "--log-json", tmp_path / "log.json"]):
        proc = run([sys.executable, *cmd])
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check = json.loads((tmp_path / "log.json").read_text())["source_check"]
    assert abs(check["first_loss"] - check["source_loss"]) <= 1e-5 * check["source_loss"], check
