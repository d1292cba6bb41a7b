"""Pretraining from an expanded checkpoint: first loss equals the source's, save/resume, the args
contract with Megatron-LM, and the "Scaling Smart" reproduction's outputs.

One run of ``examples/reproduce_scaling_smart.py --quick`` (every stage a real torchrun of the user
commands at TP 2) provides the checkpoints and histories the tests below examine.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megaclone import checkpoint as ckpt_io
from util import ROOT, run

sys.path.insert(0, str(ROOT / "examples"))
import reproduce_scaling_smart as repro  # noqa: E402

QUICK = repro.SIZES["quick"]
VARIANTS = repro.VARIANTS


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro")
    proc = run([sys.executable, "examples/reproduce_scaling_smart.py", "--quick", "--out", out,
                "--results", out / "results"], timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def report(out):
    return json.loads((out / "results" / "scaling_smart.json").read_text())


def history(path: Path) -> dict[int, float]:
    return {r["iteration"]: r["lm_loss"] for r in json.loads(path.read_text())["train"]}


def test_first_iteration_loss_equals_the_source_models(report):
    for variant in VARIANTS:
        check = report["runs"][variant]["source_check"]
        assert check["variant"] == variant
        assert abs(check["first_loss"] - check["source_loss"]) <= 1e-5 * check["source_loss"], check
    # the same batch through a model that is not a clone is far off: the check can fail
    random_first = report["runs"]["random-init"]["first_train_loss"]
    assert abs(random_first - report["runs"]["symmetric"]["source_check"]["source_loss"]) > 0.5


def _train(out: Path, *extra, n: int = 2) -> subprocess.CompletedProcess:
    base = repro.train_flags(QUICK, out / "data" / "stdlib", 1234, QUICK["train_iters"], out / "unused",
                             out / "unused.json", 2)
    launcher = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", n]
    return run([*launcher, "examples/pretrain_gpt.py", *base, *extra])


def test_resume_continues_exactly(out, tmp_path):
    """Resume the noisy-diagonal run from its iteration-10 checkpoint: iterations 11-20 repeat exactly."""
    proc = _train(out, "--load", out / "runs" / "noisy-diagonal", "--ckpt-step", "10", "--use-checkpoint-args",
                  "--save", tmp_path / "resumed", "--log-json", tmp_path / "resumed.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(iteration 10)" in proc.stdout
    original, resumed = history(out / "runs" / "noisy-diagonal.json"), history(tmp_path / "resumed.json")
    assert sorted(resumed) == list(range(11, 21))
    assert all(resumed[i] == original[i] for i in resumed), (original, resumed)
    assert (tmp_path / "resumed" / "iter_0000020").is_dir()


@pytest.fixture(scope="module")
def resumed_elsewhere(out, tmp_path_factory):
    """Largest |loss difference| from the original run over iterations 11-20 of two resumes from its
    iteration-10 checkpoint: at TP 1 x DP 2 with the optimizer state resharded, and (the control) at
    the same layout with a fresh optimizer."""
    tmp = tmp_path_factory.mktemp("resumes")
    wide = repro.shape_flags(QUICK, factor=2)
    proc = _train(out, "--load", out / "runs" / "noisy-diagonal", "--ckpt-step", "10", *wide,
                  "--tensor-model-parallel-size", "1", "--log-json", tmp / "dp2.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TP 1 x DP 2" in proc.stdout
    proc = _train(out, "--load", out / "runs" / "noisy-diagonal", "--ckpt-step", "10", "--use-checkpoint-args",
                  "--no-load-optim", "--log-json", tmp / "fresh.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    original = history(out / "runs" / "noisy-diagonal.json")
    diffs = {}
    for name in ("dp2", "fresh"):
        resumed = history(tmp / f"{name}.json")
        assert sorted(resumed) == list(range(11, 21))
        diffs[name] = max(abs(resumed[i] - original[i]) for i in resumed)
    return diffs


def test_resume_at_another_layout_reshards_weights_and_optimizer(resumed_elsewhere):
    """TP 1 x DP 2 from a TP 2 checkpoint: the same global batches, so the same losses up to rounding,
    far below what a fresh optimizer changes (the control, same iterations)."""
    d = resumed_elsewhere
    print(f"resharded resume max |diff| {d['dp2']:.3e}, fresh-optimizer control {d['fresh']:.3e}")
    assert d["dp2"] < 1e-4, d
    assert d["fresh"] > 100 * d["dp2"], d


def _readme_command_flags() -> set[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(# Megatron-LM.*?)```", text, re.S)
    assert block, "README lacks the Megatron-LM continuation command block"
    return {f[2:].replace("-", "_") for f in re.findall(r"--[a-z0-9-]+", block.group(1))}


# What Megatron-LM's --use-checkpoint-args takes from a checkpoint, written out from its
# load_args_from_checkpoint (megatron/training/checkpointing.py, NVIDIA/Megatron-LM 0032978f):
# the first group only where the command leaves the flag unset, the second always (the parallel
# sizes with --use-mp-args-from-checkpoint-args). Kept apart from megaclone's own lists on purpose.
MEGATRON_LM_IF_UNSET = ("num_layers", "hidden_size", "ffn_hidden_size", "seq_length", "num_attention_heads",
                        "kv_channels", "max_position_embeddings", "padded_vocab_size")
MEGATRON_LM_FORCED = (
    "num_query_groups", "group_query_attention", "position_embedding_type", "add_position_embedding",
    "use_rotary_position_embeddings", "rotary_base", "rotary_percent", "rotary_interleaved", "add_bias_linear",
    "add_qkv_bias", "squared_relu", "swiglu", "untie_embeddings_and_output_weights", "apply_layernorm_1p",
    "normalization", "apply_query_key_layer_scaling", "attention_dropout", "hidden_dropout", "num_experts",
    "tensor_model_parallel_size", "pipeline_model_parallel_size",
)


def test_written_args_hold_everything_the_megatron_lm_command_takes_from_them(out):
    given = _readme_command_flags()
    assert {"load", "finetune", "use_checkpoint_args", "ckpt_format"} <= given
    s = QUICK
    expected = dict(num_layers=s["num_layers"], hidden_size=2 * s["hidden_size"],
                    ffn_hidden_size=2 * s["ffn_hidden_size"], num_attention_heads=2 * s["num_attention_heads"],
                    num_query_groups=2 * s["num_query_groups"], group_query_attention=True,
                    kv_channels=s["hidden_size"] // s["num_attention_heads"], seq_length=s["seq_length"],
                    max_position_embeddings=s["seq_length"], position_embedding_type="rope",
                    add_position_embedding=False, use_rotary_position_embeddings=True, rotary_base=10000,
                    rotary_percent=1.0, rotary_interleaved=False, add_bias_linear=False, add_qkv_bias=False,
                    squared_relu=False, swiglu=True, untie_embeddings_and_output_weights=True,
                    apply_layernorm_1p=False, normalization="RMSNorm", apply_query_key_layer_scaling=False,
                    num_experts=None, padded_vocab_size=512, tensor_model_parallel_size=2,
                    pipeline_model_parallel_size=1)
    source = vars(ckpt_io.read_common(ckpt_io.find_checkpoint(out / "source"))["args"])
    expected.update(hidden_dropout=source["hidden_dropout"], attention_dropout=source["attention_dropout"])
    needed = [f for f in MEGATRON_LM_IF_UNSET if f not in given] + list(MEGATRON_LM_FORCED)
    assert set(needed) <= set(expected), sorted(set(needed) - set(expected))  # every field checked, none skipped
    for root in (out / "expanded" / "symmetric", out / "runs" / "symmetric"):
        path = ckpt_io.find_checkpoint(root)
        common = ckpt_io.read_common(path)
        args = vars(common["args"])
        assert common["checkpoint_version"] == 3.0
        for field in needed:
            assert args.get(field) == expected[field], (root, field, args.get(field))
        assert all(isinstance(v, (type(None), bool, int, float, str, list, tuple, dict)) for v in args.values())
    assert ckpt_io.read_common(ckpt_io.find_checkpoint(out / "expanded" / "symmetric"))["iteration"] == 0


def test_reproduction_report(out, report):
    assert set(report["runs"]) == set(VARIANTS) | {"random-init"}
    assert report["runs"]["random-init"]["speedup"] == pytest.approx(1.0)
    for name in report["figures"].values():
        assert (out / "results" / name).read_bytes()[:4] == b"\x89PNG"
    assert "| symmetric |" in (out / "results" / "scaling_smart.md").read_text()
    sym = report["symmetry"]
    assert all(p["all"] > 0.999999 for p in sym["symmetric"])  # noiseless clones never break symmetry
    assert sym["noisy-symmetric"][0]["all"] < 0.99 and sym["noisy-diagonal"][0]["all"] < 0.99
    assert all(abs(p["all"]) < 0.3 for p in sym["random-init"])
    spectrum = report["spectrum"]
    rank = lambda sv: sum(v > 1e-6 * sv[0] for v in sv)  # noqa: E731
    assert rank(spectrum["symmetric (init)"]) == rank(spectrum["source"])  # a symmetric clone adds no rank
    assert rank(spectrum["noisy-symmetric (init)"]) > rank(spectrum["source"])


def test_bad_training_input_is_refused(out, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _train(out, "--load", empty, "--finetune", n=1)
    assert proc.returncode == 2 and "holds no checkpoint" in proc.stderr
    proc = _train(out, "--load", out / "runs" / "symmetric", "--use-checkpoint-args", "--global-batch-size", "3")
    assert proc.returncode != 0 and "error: --global-batch-size 3 is not a multiple" in proc.stderr  # torchrun: 1


def test_finetune_from_a_hugging_face_import_checks_the_hf_source(out, tmp_path):
    """The first-batch check finds an HF source through the clone's metadata and runs it as megaclone
    reads it (rows straight from the safetensors files)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "hf"))
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", 2, "tools/expand_sharded.py",
                "--load-hf", tmp_path / "hf", "--save", tmp_path / "wide", "--tp", 2, "--variant", "noisy-diagonal"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = _train(out, "--load", tmp_path / "wide", "--finetune", "--use-checkpoint-args", "--train-iters", "2",
                  "--save", tmp_path / "ft", "--log-json", tmp_path / "ft.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check = json.loads((tmp_path / "ft.json").read_text())["source_check"]
    assert check["source"] == str((tmp_path / "hf").resolve())
    assert abs(check["first_loss"] - check["source_loss"]) <= 1e-5 * check["source_loss"]


BROKEN_READER = """
import runpy, sys
import numpy as np
sys.path.insert(0, {root!r})
import megaclone.hf as hf

right = hf.grouped_qkv


def swapped(heads, groups, head_dim):  # a reader bug: K and V rows exchanged
    f = right(heads, groups, head_dim)

    def g(r):
        part, row = f(r)
        return np.where(part == 1, 2, np.where(part == 2, 1, part)), row
    return g


hf.grouped_qkv = swapped
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_the_first_batch_check_catches_a_broken_hf_reader(out, tmp_path):
    """With K and V swapped by the reader, the clone is wrong; the check runs the HF source in
    transformers, not through the same reader, so it sees it (it passed at 3e-7 when it did not)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # weights far from init, so attention depends on what K and V hold
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(str(tmp_path / "hf"))
    wrapper = tmp_path / "broken.py"
    wrapper.write_text(BROKEN_READER.format(root=str(ROOT)))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", 2, wrapper]
    proc = run([*torchrun, "tools/expand_sharded.py", "--load-hf", tmp_path / "hf", "--save", tmp_path / "wide",
                "--tp", 2, "--factor", 1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    base = repro.train_flags(QUICK, out / "data" / "stdlib", 1234, 2, tmp_path / "ft", tmp_path / "ft.json", 2)
    proc = run([*torchrun, "examples/pretrain_gpt.py", *base, "--load", tmp_path / "wide", "--finetune",
                "--use-checkpoint-args"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check = json.loads((tmp_path / "ft.json").read_text())["source_check"]
    assert abs(check["first_loss"] - check["source_loss"]) > 1e-3 * check["source_loss"], check
