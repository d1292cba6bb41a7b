"""The command-line tools as a user runs them: torchrun, mpirun, exit codes, printed output."""

import shutil
import sys
from pathlib import Path

import pytest
from util import CLI_EXPANSION, ROOT, run, tensor_digests, torchrun, tree_hash


@pytest.fixture(scope="module")
def source(cli_source):
    before = tree_hash(cli_source)
    yield cli_source
    assert tree_hash(cli_source) == before, "the source checkpoint was modified"


@pytest.mark.slow
def test_mpirun_writes_the_same_bytes_as_torchrun(source, cli_expanded):
    mpirun = shutil.which("mpirun") or str(Path(sys.executable).parent / "mpirun")
    dst = cli_expanded.parent / "wide-mpirun"
    proc = run([mpirun, "-n", "2", sys.executable, "tools/expand_sharded.py", "--load", str(source),
                "--save", str(dst), *CLI_EXPANSION, "--no-progress"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = tensor_digests(cli_expanded), tensor_digests(dst)
    assert len(a) == 9 and all(len(row[-1]) == 64 for row in a)  # 9 llama tensors, each with a sha256
    assert a == b


@pytest.mark.slow
def test_verify_passes_per_rank_and_fails_past_tolerance(source, cli_expanded):
    from megaclone.formats import torch_dist

    args = torch_dist.read_common(torch_dist.find_checkpoint(cli_expanded))["args"]
    assert (args.num_attention_heads, args.num_query_groups) == (32, 8)  # the source's 16 heads in 8 groups
    ok = torchrun(2, "verify_logits.py", "--src", str(source), "--dst", str(cli_expanded))
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert "rank 0: vocab [0, " in ok.stdout and "rank 1: vocab [" in ok.stdout and "PASS: 2 ranks" in ok.stdout
    # the weights too, dealt to both ranks: 3 + 6 x 2 llama tensor-layers, every noise block at 10 dB
    assert "weights: PASS: 15 tensor-layers on 2 ranks" in ok.stdout, ok.stdout[-2000:]
    snr = [float(x) for x in ok.stdout.split("noise blocks at ")[1].split(" dB")[0].split(" to ")]
    assert 9.95 < snr[0] <= snr[1] < 10.05, snr
    strict = torchrun(2, "verify_logits.py", "--src", str(source), "--dst", str(cli_expanded), "--tol", "1e-12",
                      "--no-weights")
    assert strict.returncode == 1 and "FAIL" in strict.stdout and "weights" not in strict.stdout


@pytest.mark.slow
def test_moe_upcycling_flags_reach_the_checkpoint_and_the_verifier_passes(source, tmp_path):
    """Width 2 and 4 experts (top-2) over EP 2 at TP 1 from the TP 2 source, verified on 2 ranks (TP 2 x
    EP 2 on 4 ranks is proved in process by test_moe.py); that mixture grown 2x again (an MoE source:
    --ep alone), verified with its top-k choices; a process count that is not TP x EP is refused before
    anything is written."""
    dst = tmp_path / "moe"
    flags = ["--load", str(source), "--save", str(dst), "--factor", "2"]
    grown = torchrun(2, "expand_sharded.py", *flags, "--tp", "1", "--ep", "2", "--num-experts", "4",
                     "--moe-router-topk", "2", "--verify")
    assert grown.returncode == 0 and "PASS: 2 ranks" in grown.stdout, grown.stdout[-3000:] + grown.stderr[-3000:]
    assert "weights: PASS" in grown.stdout, grown.stdout[-2000:]  # each expert its slice, the router's groups tied
    again = torchrun(2, "expand_sharded.py", "--load", str(dst), "--save", str(tmp_path / "again"), "--factor", "2",
                     "--tp", "1", "--ep", "2", "--verify")
    assert again.returncode == 0 and "PASS: 2 ranks" in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]
    assert "token-layers as the source's ok" in again.stdout and "weights: PASS" in again.stdout
    short = torchrun(2, "expand_sharded.py", *flags[:3], str(tmp_path / "short"), *flags[4:], "--tp", "2",
                     "--ep", "2", "--num-experts", "4")
    assert short.returncode != 0 and "world size 2 is not a multiple of --tp 2 x --ep 2" in short.stderr
    assert not (tmp_path / "short").exists()


@pytest.mark.slow
def test_depth_flags_reach_the_checkpoint_and_verify_skips_a_stack_clone(source, tmp_path):
    """--verify: the verifier's two checks in the expansion's own processes, its lines as verify_logits.py
    prints them (the same report function)."""
    from megaclone.formats import torch_dist

    dst = tmp_path / "stacked"
    grown = torchrun(2, "expand_sharded.py", "--load", str(source), "--save", str(dst), "--tp", "2", "--factor", "1",
                     "--depth-factor", "2", "--depth-init", "stack", "--depth-placement", "top", "--verify")
    assert grown.returncode == 0, grown.stdout[-3000:] + grown.stderr[-3000:]
    common = torch_dist.read_common(torch_dist.find_checkpoint(dst))
    assert common["megaclone"]["depth"] == {"factor": 2, "init": "stack", "placement": "top"}
    assert common["args"].num_layers == 4
    assert "NOT COMPARED: this clone was grown in depth with --depth-init stack (x2)" in grown.stdout
    assert "weights: PASS: 27 tensor-layers" in grown.stdout  # the stacked copies are what --depth-init says
    assert "FAIL" not in grown.stdout


@pytest.mark.slow
def test_hf_to_hf_in_one_command_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    small = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=64, max_position_embeddings=32)).eval()
    small.save_pretrained(str(tmp_path / "small"))
    grown = torchrun(2, "expand_sharded.py", "--load-hf", str(tmp_path / "small"), "--save-hf", str(tmp_path / "wide"),
                     "--factor", "2", "--depth-factor", "2", "--verify")
    assert grown.returncode == 0, grown.stdout[-3000:] + grown.stderr[-3000:]
    # --verify: transformers on both sides, the batches dealt to the 2 ranks
    assert "PASS: 2 ranks" in grown.stdout and "weights" not in grown.stdout, grown.stdout[-2000:]
    wide = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "wide")).eval()
    assert (wide.config.hidden_size, wide.config.num_hidden_layers) == (64, 4)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = small(tokens).logits, wide(tokens).logits
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-5
    # the verifier alone, transformers on both sides: a model that is not the clone's source fails
    torch.manual_seed(1)
    small.__class__(small.config).save_pretrained(str(tmp_path / "other"))
    other = run([sys.executable, "tools/verify_logits.py", "--src-hf", tmp_path / "other", "--dst-hf", tmp_path / "wide"])
    assert other.returncode == 1 and "FAIL" in other.stdout, other.stdout[-2000:] + other.stderr[-2000:]


@pytest.mark.slow
def test_verify_fails_a_clone_whose_noise_rounding_broke_the_function(tmp_path):
    """--snr-db -40 (noise a hundred times the weights, warned about): the pairs still cancel in the
    stored weights, but not after rounding in the forward pass; --verify says FAIL and exits 1."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
        vocab_size=64, max_position_embeddings=32)).save_pretrained(str(tmp_path / "small"))
    proc = run([sys.executable, "tools/expand_sharded.py", "--load-hf", tmp_path / "small", "--save", tmp_path / "wide",
                "--tp", "1", "--variant", "noisy-symmetric", "--snr-db", "-40", "--verify", "--no-progress"])
    assert "the noise is stronger than the weights" in proc.stderr + proc.stdout
    assert proc.returncode == 1 and "FAIL: 1 ranks" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "weights: PASS" in proc.stdout  # the weights are the clone; the logits are not the source's


@pytest.mark.slow
def test_world_size_must_be_a_multiple_of_tp(source, tmp_path):
    proc = run([sys.executable, "tools/expand_sharded.py", "--load", str(source), "--save", str(tmp_path / "d"),
                "--tp", "2"])
    assert proc.returncode == 2
    assert "error: world size 1 is not a multiple of --tp 2" in proc.stderr
    assert "--nproc_per_node 2" in proc.stderr
    assert not (tmp_path / "d").exists()


TOOLS = ("expand_sharded.py", "export_hf.py", "verify_logits.py", "make_source.py", "preprocess_data.py")


@pytest.mark.parametrize("tool", TOOLS + ("../examples/pretrain_gpt.py",))
def test_help_comes_before_any_heavy_import(tool):
    proc = run([sys.executable, "-X", "importtime", f"tools/{tool}", "--help"])
    assert proc.returncode == 0 and "usage:" in proc.stdout
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    # numpy (a tenth of a second) may load: the HF family registry, which --help lists, uses it
    assert not {m for m in imported if m.split(".")[0] in ("torch", "megatron", "transformers")}, "--help imported torch"


@pytest.mark.slow
def test_a_flag_error_under_torchrun_prints_once():
    proc = torchrun(2, "expand_sharded.py", "--load", "x", "--tp", "2")
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert lines.count("error: one of the arguments --save --save-hf is required") == 1, proc.stderr[-2000:]
    assert "  fix: (every flag: expand_sharded.py --help)" in lines and "usage:" not in proc.stderr
    # printed once by rank 0, repeated in the launcher's report of each rank instead of a documentation link
    assert proc.stderr.count("one of the arguments --save --save-hf is required") >= 2, proc.stderr[-2000:]
    assert "To enable traceback" not in proc.stderr


def test_quickstart_answers_help_and_refuses_unknown_arguments():
    shown = run(["bash", "examples/quickstart.sh", "--help"])
    assert shown.returncode == 0 and "usage: bash examples/quickstart.sh" in shown.stdout
    refused = run(["bash", "examples/quickstart.sh", "--tp", "4"])
    assert refused.returncode == 2 and "unknown argument '--tp'" in refused.stderr


TRAIN = ["--data-path", "{tmp}/ds", "--seq-length", "8", "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3"]


@pytest.mark.parametrize("tool,flags,message", [
    ("expand_sharded.py", ["--load", "/nonexistent/ckpt", "--save", "{tmp}/d", "--tp", "1"],
     "--load /nonexistent/ckpt does not exist"),
    ("expand_sharded.py", ["--load", "{tmp}", "--save", "{tmp}/d", "--tp", "1", "--factor", "0"],
     "--factor 0: must be a positive"),
    ("expand_sharded.py", ["--load", "{tmp}", "--save", "{tmp}/d", "--tp", "1", "--snr-db", "nan"],
     "--snr-db nan is not a finite"),
    ("expand_sharded.py", ["--load", "{tmp}/src", "--save", "{tmp}/full", "--tp", "1"], "--save {tmp}/full is not empty"),
    ("expand_sharded.py", ["--load", "{tmp}", "--save", "{tmp}/d", "--tp", "1", "--moe-router-topk", "2"],
     "no --num-experts was given"),
    ("verify_logits.py", ["--src", "{tmp}/src", "--dst", "/nonexistent/wide"], "--dst /nonexistent/wide does not exist"),
    ("export_hf.py", ["--load", "/nonexistent/ckpt", "--save", "{tmp}/d"], "--load /nonexistent/ckpt does not exist"),
    ("export_hf.py", ["--load", "{tmp}/src", "--save", "{tmp}/full"], "--save {tmp}/full is not empty"),
    ("../examples/pretrain_gpt.py", ["--load", "/nonexistent/ckpt", "--finetune", "--use-checkpoint-args", *TRAIN],
     "--load /nonexistent/ckpt does not exist"),
    ("../examples/pretrain_gpt.py", ["--num-layers", "2", *TRAIN],
     "no model shape: --hidden-size, --num-attention-heads not given"),
    ("../examples/pretrain_gpt.py", ["--num-layers", "2", "--hidden-size", "8", "--num-attention-heads", "2",
                                     "--tensor-model-parallel-size", "2", *TRAIN],
     "world size 1 is not a multiple of --tensor-model-parallel-size 2"),
])
def test_flag_and_path_refusals_come_before_torch_is_imported(tmp_path, tool, flags, message):
    (tmp_path / "src").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("a user's file")
    args = [f.format(tmp=tmp_path) for f in flags]
    proc = run([sys.executable, "-X", "importtime", f"tools/{tool}", *args])
    assert proc.returncode == 2 and message.format(tmp=tmp_path) in proc.stderr, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert not {m for m in imported if m.split(".")[0] in ("torch", "megatron", "transformers")}, "refused after importing torch"
    assert not (tmp_path / "d").exists() and (tmp_path / "full" / "notes.txt").exists()


def test_a_mistyped_flag_names_the_closest_one():
    proc = run([sys.executable, "tools/expand_sharded.py", "--load", "x", "--save", "y", "--tp", "1", "--facter", "2"])
    assert proc.returncode == 2 and "did you mean: --facter -> --factor?" in proc.stderr, proc.stderr[-1000:]
    assert proc.stderr.splitlines()[1].startswith("  fix: did you mean: --facter -> --factor?")


def test_megatron_lm_flag_names_are_aliases(tmp_path):
    """--tensor-model-parallel-size, --expert-model-parallel-size and --pipeline-model-parallel-size are
    --tp, --ep and --pp (the flags parse: the refusal that follows is about the factor)."""
    proc = run([sys.executable, "tools/expand_sharded.py", "--load", str(tmp_path), "--save", str(tmp_path / "d"),
                "--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2", "--num-experts", "4",
                "--pipeline-model-parallel-size", "1", "--factor", "0"])
    assert proc.returncode == 2 and "--factor 0: must be a positive" in proc.stderr, proc.stderr


@pytest.mark.parametrize("flags,hint", [
    (["--lod", "x", "--save", "y", "--tp", "1"], "--lod -> --load"),  # a required flag, reported as missing
    (["--load", "x", "--save", "y", "--tp", "1", "--num-expert", "8"], "--num-expert -> --num-experts"),  # no prefix
])
def test_every_misspelled_flag_gets_a_fix_line(flags, hint):
    proc = run([sys.executable, "tools/expand_sharded.py", *flags])
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 2 and lines[0].startswith("error: "), proc.stderr
    assert lines[1] == f"  fix: did you mean: {hint}? (every flag: expand_sharded.py --help)"


@pytest.mark.parametrize("tool", TOOLS)
def test_a_tools_parse_args_runs_from_python(tool):
    """The flag parser of each tool is callable from Python (--help exits 0), importing no torch."""
    import subprocess

    code = (f"import importlib.util, sys\nspec = importlib.util.spec_from_file_location('t', 'tools/{tool}')\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "try:\n    m.parse_args(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
