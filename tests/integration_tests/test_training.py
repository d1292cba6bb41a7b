"""Pretraining from an expanded checkpoint: first loss equals the source's, save/resume, the args
contract with Megatron-LM, symmetry with and without dropout.

A small pipeline of the user commands at TP 2 (the reproduction's quick shape and recipe) provides
the checkpoints and histories the tests below examine: byte data, a source trained 30 iterations
(checkpoints at 10, 20, 30), and its symmetric and noisy-diagonal clones, each trained 20 iterations
(dropout 0 and the source's 0.1). The reproduction's
report functions are tested on its stored JSON (test_paper.py); the reproduction itself is run as
the README says, not in the suite.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from util import ROOT, run, torchrun

from megaclone.formats import iterations, torch_dist
from megaclone.train.data import preprocess

sys.path.insert(0, str(ROOT / "examples"))
import reproduce_scaling_smart as repro  # noqa: E402  (its command builders: the recipe the tests train with)

pytestmark = pytest.mark.slow  # torchrun jobs

QUICK = repro.SIZES["quick"]
SOURCE_ITERS, CLONE_ITERS = QUICK["source_iters"], QUICK["train_iters"]
RUNS = {  # name: (expansion, flags)
    "symmetric-dropout0": ("symmetric", ["--hidden-dropout", "0", "--attention-dropout", "0"]),
    "noisy-diagonal": ("noisy-diagonal", []),
}


def _run_ok(cmd: list) -> subprocess.CompletedProcess:
    proc = run(cmd, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("training")
    data = {"train": out / "data" / "train", "valid": out / "data" / "valid"}
    for name, (skip, count) in (("valid", (0, 10)), ("train", (10, 60))):  # disjoint documents
        preprocess(data[name], seed=1234, skip_documents=skip, max_documents=count)  # the tool is test_data.py's
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "examples/pretrain_gpt.py"]
    _run_ok([*launch, *repro.shape_flags(QUICK), *repro.train_flags(
        QUICK, data, 1234, SOURCE_ITERS, out / "source", out / "source.json", 2, schedule=repro.SOURCE_LR,
        save_interval=SOURCE_ITERS // 3)])
    for variant in {v for v, _ in RUNS.values()}:
        proc = torchrun(2, "expand_sharded.py", "--load", out / "source", "--save", out / "expanded" / variant,
                        "--tp", "2", "--factor", "2", "--variant", variant, "--seed", "1", "--no-progress")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name, (variant, extra) in RUNS.items():
        shape = repro.shape_flags(QUICK, factor=2) if extra else ["--use-checkpoint-args"]
        _run_ok([*launch, "--load", out / "expanded" / variant, "--finetune", *shape, *repro.train_flags(
            QUICK, data, 1, CLONE_ITERS, out / "runs" / name, out / "runs" / f"{name}.json", 2,
            save_interval=CLONE_ITERS // 2), *extra])
    return out


def log(out: Path, name: str) -> dict:
    return json.loads((out / "runs" / f"{name}.json").read_text())


def history(path: Path) -> dict[int, float]:
    return {r["iteration"]: r["lm_loss"] for r in json.loads(path.read_text())["train"]}


def test_first_iteration_loss_equals_the_source_models(out):
    for name, (variant, _) in RUNS.items():
        check = log(out, name)["source_check"]
        assert check["variant"] == variant
        assert abs(check["first_loss"] - check["source_loss"]) <= 1e-5 * check["source_loss"], check
    # a model that is not a clone (the source at its random init, on a batch of the same data) is far
    # off: the check can fail
    random_first = json.loads((out / "source.json").read_text())["train"][0]["lm_loss"]
    assert abs(random_first - log(out, "symmetric-dropout0")["source_check"]["source_loss"]) > 0.5


def _train(out: Path, *extra, n: int = 2) -> subprocess.CompletedProcess:
    data = {"train": out / "data" / "train", "valid": out / "data" / "valid"}
    base = repro.train_flags(QUICK, data, 1, QUICK["train_iters"], out / "unused", out / "unused.json", 2)
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
    settings = json.loads((tmp_path / "resumed.json").read_text())["settings"]
    assert settings["hidden_dropout"] == settings["attention_dropout"] == 0.1  # masks drawn, and drawn again


def test_a_resume_with_another_global_batch_size_continues_from_the_samples_consumed(out, tmp_path):
    """Iteration 10 at global batch 8 consumed samples 0-79; resumed at global batch 16, iteration 11
    reads samples 80-95 and the token count continues from 80 samples, not from 10 x 16."""
    proc = _train(out, "--load", out / "runs" / "noisy-diagonal", "--ckpt-step", "10", "--use-checkpoint-args",
                  "--global-batch-size", "16", "--train-iters", "11", "--eval-iters", "0",
                  "--log-json", tmp_path / "b.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [record] = json.loads((tmp_path / "b.json").read_text())["train"]
    assert record["iteration"] == 11 and record["tokens"] == (80 + 16) * QUICK["seq_length"]


def test_an_upcycled_mixture_of_experts_trains_from_the_source_loss_the_same_at_every_ep(out, tmp_path):
    """The source grown 2x and upcycled to 4 experts (top-2), written for EP 2 and trained from it at EP 2
    and at EP 1 (megatron-core reshards the experts on load), each 3 iterations on 2 ranks with megatron-core's MoE layer and a load-balancing loss: the first-batch
    loss is the dense source's, the load-balancing loss is logged apart, and EP 2 (each rank half the
    experts) follows EP 1 (every rank all of them) step for step, which holds only if expert gradients
    are averaged as Megatron does (summed over expert replicas, divided by the data-parallel size).

    The dense source is the TP 2 source converted to TP 1 first (factor 1, in process: the user's
    command is the upcycling): a TP 1 destination re-pads the vocabulary for TP 1 (384 rows, not 512),
    and Megatron's loss covers padding rows."""
    import megaclone

    moe = ["--factor", "2", "--num-experts", "4", "--moe-router-topk", "2", "--no-progress"]
    dense, ep2 = tmp_path / "dense-tp1", tmp_path / "ep2"
    megaclone.init_distributed("cpu")
    megaclone.grow(out / "source", dense, megaclone.Factors.uniform(1), 1)
    proc = torchrun(2, "expand_sharded.py", "--load", dense, "--save", ep2, "--tp", "1", "--ep", "2", *moe)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs, stdout = {}, {}
    # the EP 1 run loads the same EP 2 checkpoint: megatron-core gathers each rank's experts from both files
    for name, ckpt, ep in (("ep2", ep2, "2"), ("ep1", ep2, "1")):
        # the shape on the command line, not --use-checkpoint-args (it would force the source's dropout 0.1,
        # whose masks depend on the layout)
        proc = _train(out, "--load", ckpt, "--finetune", *repro.shape_flags(QUICK, factor=2), "--num-experts", "4",
                      "--moe-router-topk", "2", "--expert-model-parallel-size", ep, "--tensor-model-parallel-size", "1",
                      "--train-iters", "3", "--hidden-dropout", "0", "--attention-dropout", "0",
                      "--moe-aux-loss-coeff", "0.01", "--eval-iters", "0", "--log-json", tmp_path / f"{name}.json")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[name], stdout[name] = json.loads((tmp_path / f"{name}.json").read_text()), proc.stdout
    assert "load balancing loss" in stdout["ep2"]
    check = runs["ep2"]["source_check"]
    assert abs(check["first_loss"] - check["source_loss"]) <= 1e-5 * check["source_loss"], check
    for name in runs:
        assert all(0.9 < r["load_balancing_loss"] < 4 for r in runs[name]["train"])
    steps = {name: [(r["lm_loss"], r["grad_norm"]) for r in run["train"]] for name, run in runs.items()}
    assert len(steps["ep2"]) == 3
    for (loss2, norm2), (loss1, norm1) in zip(steps["ep2"], steps["ep1"]):
        assert abs(loss2 - loss1) <= 1e-5 * loss1 and abs(norm2 - norm1) <= 1e-4 * norm1, steps
    upcycled_args = _train(out, "--load", ep2, "--finetune", "--use-checkpoint-args", "--train-iters", "2",
                           "--eval-iters", "0", "--log-json", tmp_path / "args.json")
    assert upcycled_args.returncode == 0, upcycled_args.stdout[-3000:] + upcycled_args.stderr[-3000:]
    assert "4 experts (top-2, ffn 128) over EP 2; TP 1 x DP 2" in upcycled_args.stdout  # from the checkpoint


@pytest.fixture(scope="module")
def resumed_elsewhere(out, tmp_path_factory):
    """Largest |loss difference| from the original run over iterations 11-20 of two resumes from its
    iteration-10 checkpoint: at TP 1 x DP 2 with the optimizer state resharded, and (the control) at
    the same layout with a fresh optimizer. The run without dropout: dropout masks depend on the
    layout (per TP rank RNG streams), in Megatron as here."""
    tmp = tmp_path_factory.mktemp("resumes")
    wide = repro.shape_flags(QUICK, factor=2)
    proc = _train(out, "--load", out / "runs" / "symmetric-dropout0", "--ckpt-step", "10", *wide,
                  "--hidden-dropout", "0", "--attention-dropout", "0", "--tensor-model-parallel-size", "1", "--log-json", tmp / "dp2.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TP 1 x DP 2" in proc.stdout
    proc = _train(out, "--load", out / "runs" / "symmetric-dropout0", "--ckpt-step", "10", "--use-checkpoint-args",
                  "--no-load-optim", "--log-json", tmp / "fresh.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    original = history(out / "runs" / "symmetric-dropout0.json")
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
    text = (ROOT / "docs" / "training.md").read_text()
    block = re.search(r"```bash\n(# Megatron-LM.*?)```", text, re.S)
    assert block, "docs/training.md lacks the Megatron-LM continuation command block"
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
    source = vars(torch_dist.read_common(torch_dist.find_checkpoint(out / "source"))["args"])
    expected.update(hidden_dropout=source["hidden_dropout"], attention_dropout=source["attention_dropout"])
    needed = [f for f in MEGATRON_LM_IF_UNSET if f not in given] + list(MEGATRON_LM_FORCED)
    assert set(needed) <= set(expected), sorted(set(needed) - set(expected))  # every field checked, none skipped
    for root in (out / "expanded" / "symmetric", out / "runs" / "noisy-diagonal"):
        path = torch_dist.find_checkpoint(root)
        common = torch_dist.read_common(path)
        args = vars(common["args"])
        assert common["checkpoint_version"] == 3.0
        for field in needed:
            assert args.get(field) == expected[field], (root, field, args.get(field))
        assert all(isinstance(v, (type(None), bool, int, float, str, list, tuple, dict)) for v in args.values())
    assert torch_dist.read_common(torch_dist.find_checkpoint(out / "expanded" / "symmetric"))["iteration"] == 0


def test_symmetry_lasts_without_dropout_and_noise_starts_below_it(out):
    """Figure 5's measure (the mean per-row cosine between a clone's copies, scaling.group_row_cosines):
    the symmetric clone trained without dropout stays at cosine 1 in every group; the noisy-diagonal
    clone starts below 1 where noise went in, its output layer (no noise, cloned symmetrically under
    the diagonal variant) at 1, and training with dropout 0.1 moves it further."""
    from megaclone.pipeline.rules import param_rules
    from megaclone.shape.spec import ModelSpec
    from megaclone.study.paper import group_row_cosines

    def spec(path):
        return ModelSpec.from_args(torch_dist.read_common(path)["args"])

    def cosines(path):
        tensors = {k: v for k, v in torch_dist.load_plain_tensors(path).items()
                   if hasattr(v, "shape") and not k.startswith("optimizer")}
        return group_row_cosines(rules, tensors)

    from megaclone.runtime import init_distributed

    init_distributed("cpu")
    source = torch_dist.find_checkpoint(out / "source")
    rules = param_rules(spec(source), spec(torch_dist.find_checkpoint(out / "expanded" / "symmetric")))
    kept = [cosines(out / "runs" / "symmetric-dropout0" / iterations.iteration_dirname(i)) for i in (10, 20)]
    assert all(c > 1 - 1e-9 for point in kept for c in point.values()), kept
    noisy_init = cosines(torch_dist.find_checkpoint(out / "expanded" / "noisy-diagonal"))
    assert noisy_init["ffn"] < 0.999 and noisy_init["output"] > 1 - 1e-9, noisy_init
    trained = cosines(out / "runs" / "noisy-diagonal" / iterations.iteration_dirname(CLONE_ITERS))
    assert trained["output"] < 1 - 1e-6, trained  # dropout sends the copies different gradients


def test_a_bf16_clone_trains_saves_bf16_weights_and_resumes_from_its_fp32_main_weights(out, tmp_path):
    """--bf16 as Megatron-LM means it: the symmetric clone trained 4 iterations in bf16 starts from the
    source's loss (within bf16's tolerance), saves bf16 model weights beside fp32 main weights and fp32
    Adam moments (Megatron-LM's Float16Optimizer layout), and a resume from iteration 2 that takes the
    precision from the checkpoint's args repeats iterations 3 and 4 exactly, which holds only if the
    fp32 main weights were restored (the bf16 weights alone lose their low bits)."""
    clone = out / "expanded" / "symmetric"
    flags = ["--use-checkpoint-args", "--train-iters", "4", "--eval-iters", "0"]
    whole = _train(out, "--load", clone, "--finetune", "--bf16", *flags, "--save-interval", "2",
                   "--save", tmp_path / "bf16", "--log-json", tmp_path / "whole.json")
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    assert "bf16 (fp32 main weights)" in whole.stdout
    check = json.loads((tmp_path / "whole.json").read_text())["source_check"]
    assert check["ok"] and check["abs_diff"] <= 2e-2 * check["source_loss"], check
    from megaclone.runtime import init_distributed

    init_distributed("cpu")  # megatron-core's plain-tensor load is a collective
    stored = torch_dist.load_plain_tensors(torch_dist.find_checkpoint(tmp_path / "bf16"))
    weights = {k: v for k, v in stored.items() if hasattr(v, "dtype") and not k.startswith("optimizer")}
    assert weights and all(v.dtype == torch.bfloat16 for v in weights.values()), {k: v.dtype for k, v in weights.items()}
    for kind in ("fp32_param", "exp_avg", "exp_avg_sq"):
        state = {k: v for k, v in stored.items() if k.startswith(f"optimizer.state.{kind}.")}
        assert {k.split(f"{kind}.", 1)[1] for k in state} == set(weights), kind
        assert all(v.dtype == torch.float32 for v in state.values()), kind
    resumed = _train(out, "--load", tmp_path / "bf16", "--ckpt-step", "2", *flags,
                     "--log-json", tmp_path / "resumed.json")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "bf16 (fp32 main weights)" in resumed.stdout  # from the checkpoint's args
    original, again = history(tmp_path / "whole.json"), history(tmp_path / "resumed.json")
    assert sorted(again) == [3, 4] and all(again[i] == original[i] for i in again), (original, again)


def test_an_fp16_clone_trains_with_loss_scaling_and_saves_fp16_weights(out, tmp_path):
    proc = _train(out, "--load", out / "expanded" / "symmetric", "--finetune", "--use-checkpoint-args", "--fp16",
                  "--initial-loss-scale", "4096", "--train-iters", "2", "--eval-iters", "0",
                  "--save", tmp_path / "fp16", "--log-json", tmp_path / "fp16.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = json.loads((tmp_path / "fp16.json").read_text())
    assert run["source_check"]["ok"], run["source_check"]
    assert [r["loss_scale"] for r in run["train"]] == [4096.0, 4096.0] and not any(r["skipped"] for r in run["train"])
    from megaclone.runtime import init_distributed

    init_distributed("cpu")
    stored = torch_dist.load_plain_tensors(torch_dist.find_checkpoint(tmp_path / "fp16"))
    assert stored["decoder.layers.mlp.linear_fc2.weight"].dtype == torch.float16
    assert float(torch_dist.read_common(torch_dist.find_checkpoint(tmp_path / "fp16"))["optimizer"]["grad_scaler"]["scale"]) == 4096.0
