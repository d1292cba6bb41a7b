"""Every config field is checked before it is used: a Hugging Face config.json (type, range, finiteness,
a layer count the stored tensors hold, safetensors dtypes) and Megatron args alike, each refusal one
MegacloneError naming the field, and nothing written. In this process, plus one CLI run for the exit
status and the absence of a traceback."""

import json
import math
import subprocess
import sys
import time

import pytest
import torch
from util import ROOT, rewrite_common

from megaclone.errors import MegacloneError
from megaclone.formats.hf.reader import open_hf_source

BAD_FIELDS = [
    ("rms_norm_eps", float("nan"), "rms_norm_eps is NaN, but it must be a positive finite number"),
    ("rms_norm_eps", -1e-6, "rms_norm_eps is -1e-06"),
    ("rms_norm_eps", "1e-6", "rms_norm_eps is \"1e-6\""),
    ("rope_theta", -10000.0, "rope_theta is -10000.0"),
    ("hidden_size", "64", "hidden_size is \"64\", but it must be a positive integer"),
    ("hidden_size", 64.0, "hidden_size is 64.0"),
    ("hidden_size", 0, "hidden_size is 0"),
    ("num_attention_heads", True, "num_attention_heads is true"),
    ("num_key_value_heads", [2], "num_key_value_heads is \\[2\\]"),
    ("num_hidden_layers", 1_000_000_000, "declares 1000000000 layers, but the safetensors files hold 2"),
    ("num_hidden_layers", 3, "declares 3 layers, but the safetensors files hold 2"),
    ("tie_word_embeddings", "false", "tie_word_embeddings is \"false\", but it must be true or false"),
    ("partial_rotary_factor", 7.5, "partial_rotary_factor is 7.5, but it must be a number from 0 to 1"),
    ("num_key_value_heads", 3, "num_query_groups is 3, but it must be a divisor of the 4 attention heads"),
    ("final_logit_softcapping", float("nan"), "final_logit_softcapping is NaN"),
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("hf") / "llama"
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(root)
    return root


def _with_config(hf_dir, tmp_path, edit):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config = edit(config)
    (bad / "config.json").write_text(json.dumps(config))
    return bad


@pytest.mark.parametrize("field,value,said", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in BAD_FIELDS])
def test_a_bad_config_field_is_refused_by_name(hf_dir, tmp_path, field, value, said):
    bad = _with_config(hf_dir, tmp_path, lambda c: {**c, field: value})
    with pytest.raises(MegacloneError, match=said) as info:
        open_hf_source(bad)
    assert info.value.fix


@pytest.mark.parametrize("field", ["hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                                   "intermediate_size"])
def test_a_missing_size_is_refused_by_name(hf_dir, tmp_path, field):
    bad = _with_config(hf_dir, tmp_path, lambda c: {k: v for k, v in c.items() if k != field})
    with pytest.raises(MegacloneError, match=field):
        open_hf_source(bad)


def test_a_config_that_is_not_an_object_is_refused(hf_dir, tmp_path):
    bad = _with_config(hf_dir, tmp_path, lambda c: [c])
    with pytest.raises(MegacloneError, match="holds a JSON list, not an object"):
        open_hf_source(bad)


def test_an_integer_safetensors_dtype_is_refused_by_name(tmp_path):
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "m" / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    save_file(tensors, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MegacloneError, match="'model.norm.weight' .* is stored as I32, which megaclone does not read"):
        open_hf_source(tmp_path / "m")


@pytest.fixture(scope="module")
def megatron_source(tmp_path_factory):
    from megaclone import sample
    from megaclone.runtime import init_distributed
    from megaclone.shape import presets

    init_distributed("cpu")
    root = tmp_path_factory.mktemp("mcore") / "src"
    sample.make_source(root, presets.preset_spec("llama", 1), train_steps=0)
    return root


@pytest.mark.parametrize("field,value,said", [
    ("norm_epsilon", float("nan"), "norm_epsilon is nan, but it must be a positive finite number"),
    ("hidden_size", 64.5, "hidden_size is 64.5, but it must be a positive integer"),
    ("rotary_base", -1, "rotary_base is -1"),
    ("swiglu", "yes", "swiglu is 'yes', but it must be true or false"),
])
def test_bad_megatron_args_are_refused_by_name(megatron_source, tmp_path, field, value, said):
    import shutil

    from megaclone.formats.source import open_source
    from megaclone.formats.torch_dist import find_checkpoint

    bad = tmp_path / "bad"
    shutil.copytree(megatron_source, bad)

    def edit(state):
        setattr(state["args"], field, value)
        if field == "swiglu":  # from_args reads flags as given: store it where the spec keeps it
            state["args"].swiglu = value

    rewrite_common(find_checkpoint(bad), edit)
    with pytest.raises(MegacloneError, match=said):
        open_source(bad)


@pytest.mark.slow
@pytest.mark.parametrize("edit", [
    lambda c: {**c, "rms_norm_eps": float("nan")},
    lambda c: {**c, "num_hidden_layers": 1_000_000},
    lambda c: [c],
], ids=["nan-eps", "a-million-layers", "a-list"])
def test_the_cli_refuses_a_bad_config_at_once_without_a_traceback(hf_dir, tmp_path, edit):
    bad = _with_config(hf_dir, tmp_path, edit)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "tools/expand_sharded.py", "--load-hf", str(bad), "--save-hf",
                           str(tmp_path / "out"), "--factor", "2"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and time.time() - t0 < 20, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and "\n  fix: " in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    assert math.isfinite(time.time())
