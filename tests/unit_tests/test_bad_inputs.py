"""Bad input is refused with an error naming the problem and the fix, before anything is written.

Runs the library in this process as a world of one (gloo), against a real source checkpoint.
"""

import shutil
from pathlib import Path

import pytest
import torch
from util import overwrite_stored_value, rewrite_common, tmpfs, tree_hash

from megaclone import sample
from megaclone.errors import MegacloneError
from megaclone.formats import iterations, torch_dist
from megaclone.formats.torch_dist import open_torch_dist_source
from megaclone.pipeline.expand import destination_spec, expand
from megaclone.shape import presets
from megaclone.shape.request import Depth, Factors
from megaclone.shape.spec import Experts


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from megaclone.runtime import init_distributed

    init_distributed("cpu")
    root = tmp_path_factory.mktemp("bad") / "src"
    sample.make_source(root, presets.preset_spec("llama", 1), train_steps=1)
    before = tree_hash(root)
    yield root
    assert tree_hash(root) == before, "the source checkpoint was modified"


def refused(src, dst, match, **kwargs):
    kwargs.setdefault("factors", Factors.uniform(2))
    kwargs.setdefault("tp", 1)
    before = tree_hash(Path(dst)) if Path(dst).exists() else None
    with pytest.raises(MegacloneError, match=match) as info:
        expand(src, dst, **kwargs)
    assert info.value.fix, "every refusal says how to fix it"
    if before is None:  # nothing that looks like a checkpoint appeared
        assert not (Path(dst) / iterations.LATEST).exists()
    else:  # an existing destination is left exactly as it was
        assert tree_hash(Path(dst)) == before
    return info.value


def copy_of(source, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(source, dst)
    return dst


def test_factor_must_be_a_positive_integer(source, tmp_path):
    refused(source, tmp_path / "d", "factor must be a positive integer", factors=Factors(2, 0, 2))


@pytest.mark.parametrize("depth,match", [(dict(factor=0), "depth factor must be a positive integer"),
                                         (dict(factor=2.0), "depth factor must be a positive integer"),
                                         (dict(factor=2, init="zero"), "unknown depth init 'zero'"),
                                         (dict(factor=2, placement="bottom"), "unknown depth placement 'bottom'")])
def test_a_bad_depth_request_is_refused_with_the_flag_to_fix(depth, match):
    with pytest.raises(MegacloneError, match=match) as err:
        Depth(**depth)
    assert "--depth-" in err.value.fix


@pytest.mark.parametrize("experts,match,flag", [
    (dict(num=4, topk=5), "--moe-router-topk 5 is larger than --num-experts 4", "at most 4"),
    (dict(num=6, topk=2, parallel=4), "--num-experts 6 does not divide over --ep 4", "divides"),
    (dict(num=4, topk=1), "top-1 routing does not preserve the function", "--moe-router-topk 2"),
    (dict(num=1, topk=1), "at least 2 experts", "--num-experts 2"),
    (dict(num=4, topk=2, score_function="sigmoid"), "sigmoid", "--moe-router-score-function softmax"),
    (dict(num=4, topk=2, pre_softmax=True), "pre-softmax with top-2 of 4", "leave out --moe-router-pre-softmax"),
    (dict(num=4, topk=2, load_balancing_type="sinkhorn"), "sinkhorn", "aux_loss"),
    (dict(num=4, topk=2, router_init="ones"), "unknown router init", "--moe-router-init"),
    (dict(num=0, topk=2), "--num-experts must be a positive integer", "--num-experts"),
])
def test_a_router_setting_that_changes_the_function_is_refused_with_the_fix(experts, match, flag):
    with pytest.raises(MegacloneError, match=match) as err:
        Experts(**experts).check_routing()
    assert flag in err.value.fix


def test_a_zero_router_cannot_pick_whole_groups_of_granular_experts():
    with pytest.raises(MegacloneError, match="zero router ties every expert") as err:
        Experts(4, 2, ffn_hidden_size=48, router_init="zero").check_upcycling(96)
    assert "--moe-router-init random" in err.value.fix
    Experts(4, 4, ffn_hidden_size=48, router_init="zero").check_upcycling(96)  # top-k = every expert: exact


def test_world_must_hold_whole_tp_groups(source, tmp_path):
    refused(source, tmp_path / "d", "not a multiple of --tp 3", tp=3)


def test_widths_must_divide_by_destination_tp(source):
    src = open_torch_dist_source(source)
    with pytest.raises(MegacloneError, match="16 attention heads, which does not divide by --tp 3"):
        destination_spec(src, Factors(2, 1, 2), 3)
    with pytest.raises(MegacloneError, match="16 query groups, which does not divide by --tp 32"):
        destination_spec(src, Factors(2, 2, 1), 32)
    with pytest.raises(MegacloneError, match="96 FFN hidden size, which does not divide by --tp 64"):
        destination_spec(src, Factors(2, 8, 1), 64)


def test_missing_tracker_file(source, tmp_path):
    src = copy_of(source, tmp_path)
    (src / iterations.LATEST).unlink()
    refused(src, tmp_path / "d", "latest_checkpointed_iteration.txt")


def test_missing_shard_file_is_named(source, tmp_path):
    src = copy_of(source, tmp_path)
    victim = sorted(src.rglob("*.distcp"))[0]
    victim.unlink()
    err = refused(src, tmp_path / "d", "is missing")
    assert victim.name in str(err)


def test_truncated_shard_file_is_named(source, tmp_path):
    src = copy_of(source, tmp_path)
    victim = sorted(src.rglob("*.distcp"))[-1]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    err = refused(src, tmp_path / "d", "truncated")
    assert victim.name in str(err)


def _rewrite_args(src: Path, **changes):
    rewrite_common(torch_dist.find_checkpoint(src), lambda common: vars(common["args"]).update(changes))


def test_args_that_contradict_the_weights(source, tmp_path):
    src = copy_of(source, tmp_path)
    _rewrite_args(src, ffn_hidden_size=128)
    refused(src, tmp_path / "d", "args imply")


def test_unsupported_model_features(source, tmp_path):
    src = copy_of(source, tmp_path)
    _rewrite_args(src, multi_latent_attention=True)
    refused(src, tmp_path / "d", "multi-latent attention")


def test_args_that_claim_experts_the_weights_lack(source, tmp_path):
    src = copy_of(source, tmp_path)
    _rewrite_args(src, num_experts=8)
    refused(src, tmp_path / "d", "no tensor 'decoder.layers.mlp.router.weight', which its args imply")


def test_non_empty_destination_needs_overwrite(source, tmp_path):
    dst = tmp_path / "d"
    dst.mkdir()
    (dst / iterations.LATEST).write_text("5")
    refused(source, dst, "not empty")
    (dst / "notes.txt").write_text("mine")
    refused(source, dst, "not part of a Megatron checkpoint", overwrite=True)
    assert (dst / "notes.txt").exists()


def test_destination_may_not_overlap_the_source(source, tmp_path):
    refused(source, source, "is the source", overwrite=True)
    refused(source, source / "inner", "is inside the source", overwrite=True)
    refused(source, source.parent, "contains the source", overwrite=True)
    link = tmp_path / "link"
    link.symlink_to(source)
    refused(source, link, "is the source", overwrite=True)
    refused(link, source, "is the source", overwrite=True)


def test_overwrite_replaces_an_old_checkpoint(source, tmp_path):
    dst = tmp_path / "d"
    expand(source, dst, Factors.uniform(2), 1)
    (dst / "iter_0000007").mkdir()
    expand(source, dst, Factors.uniform(2), 1, overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == ["iter_0000000", iterations.LATEST]


def test_overwrite_never_removes_a_users_files(source, tmp_path):
    """Names that merely look like a checkpoint's (iter_notes.md, release/NOTES.txt) are a user's."""
    dst = tmp_path / "d"
    expand(source, dst, Factors.uniform(2), 1)
    (dst / "iter_notes.md").write_text("mine")
    err = refused(source, dst, "not part of a Megatron checkpoint", overwrite=True)
    assert "iter_notes.md" in str(err)
    (dst / "iter_notes.md").unlink()
    (dst / "release").mkdir()
    (dst / "release" / "NOTES.txt").write_text("mine")
    err = refused(source, dst, "not part of a Megatron checkpoint", overwrite=True)
    assert "release/NOTES.txt" in str(err)


def test_overwrite_refuses_a_symlinked_iteration_directory_before_removing_anything(source, tmp_path):
    dst = tmp_path / "d"
    expand(source, dst, Factors.uniform(2), 1)
    elsewhere = tmp_path / "elsewhere"
    (dst / "iter_0000000").rename(elsewhere)
    (dst / "iter_0000000").symlink_to(elsewhere)
    refused(source, dst, "iter_0000000", overwrite=True)  # the tracker file is still there (tree unchanged)
    assert (elsewhere / "metadata.json").exists()


def test_a_second_job_on_the_same_destination_is_refused(source, tmp_path):
    from megaclone.formats.destination import DestinationLock

    dst = tmp_path / "d"
    held = DestinationLock(dst)  # another job's rank 0 holds the destination
    try:
        refused(source, dst, "another job is writing")
    finally:
        held.release()
    expand(source, dst, Factors.uniform(2), 1)  # released: the destination is free again


@pytest.mark.parametrize("snr", ["nan", "inf", "-inf"])
def test_snr_must_be_finite(snr):
    from megaclone.pipeline.clone import CloneConfig, Variant

    with pytest.raises(MegacloneError, match="not a finite number"):
        CloneConfig(Variant.NOISY_SYMMETRIC, float(snr))


def test_noise_stronger_than_the_weights_warns():
    from megaclone.pipeline.clone import CloneConfig, Variant

    assert CloneConfig(Variant.NOISY_DIAGONAL, 10.0).warnings() == []
    assert CloneConfig(Variant.SYMMETRIC, -20.0).warnings() == []  # no noise is added
    [warning] = CloneConfig(Variant.NOISY_SYMMETRIC, -15.0).warnings()
    assert "--snr-db -15" in warning and "verify_logits" in warning


def test_an_exact_symmetric_clone_without_dropout_warns_with_the_fix():
    from megaclone.pipeline.clone import CloneConfig, Variant

    [warning] = CloneConfig(Variant.SYMMETRIC).warnings(hidden_dropout=0.0, attention_dropout=0.0)
    assert "never separates" in warning and "noisy-symmetric" in warning and "--hidden-dropout" in warning
    assert CloneConfig(Variant.SYMMETRIC).warnings(0.1, 0.0) == []  # hidden dropout breaks the symmetry
    assert CloneConfig(Variant.SYMMETRIC).warnings(None, None) == []  # not recorded: Megatron-LM's 0.1
    assert CloneConfig(Variant.NOISY_SYMMETRIC).warnings(0.0, 0.0) == []


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_source_values_are_refused_by_name(source, tmp_path, value):
    src = copy_of(source, tmp_path)
    overwrite_stored_value(src, "decoder.layers.mlp.linear_fc2.weight", 0, value)
    err = refused(src, tmp_path / "d", "NaN or infinite")
    assert "decoder.layers.mlp.linear_fc2.weight (layer 0)" in str(err) and "--allow-non-finite" in err.fix
    expand(src, tmp_path / "d", Factors.uniform(2), 1, allow_non_finite=True)


def test_corrupted_shard_bytes_are_refused(source, tmp_path):
    src = copy_of(source, tmp_path)
    victim = max(src.rglob("*.distcp"), key=lambda p: p.stat().st_size)
    victim.write_bytes(torch.randint(0, 256, (victim.stat().st_size,), dtype=torch.uint8).numpy().tobytes())
    refused(src, tmp_path / "d", "damaged|cannot read")


@pytest.mark.parametrize("text", ["", "garbage\n", "12abc"])
def test_empty_or_garbage_tracker_file(source, tmp_path, text):
    src = copy_of(source, tmp_path)
    (src / iterations.LATEST).write_text(text)
    refused(src, tmp_path / "d", "not an iteration number")


def test_load_of_a_file_says_it_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    refused(f, tmp_path / "d", "is a file")


def _export_refused(load, save, match, overwrite=True):
    from megaclone.export import export_hf

    guarded = [Path(load), Path(save)]
    before = {p: tree_hash(p) for p in guarded if p.exists()}
    with pytest.raises(MegacloneError, match=match) as info:
        export_hf(load, save, "llama", overwrite=overwrite)
    assert info.value.fix
    assert {p: tree_hash(p) for p in guarded if p.exists()} == before, "a refused export changed files"


def test_export_never_deletes_its_source_or_a_users_files(source, tmp_path):
    tree = tmp_path / "runs"
    shutil.copytree(source, tree / "x")
    _export_refused(tree / "x", tree, "contains the source")  # the old one-way check deleted runs/x here
    _export_refused(torch_dist.find_checkpoint(tree / "x"), tree / "x", "contains the source")
    _export_refused(tree / "x", tree / "x" / "hf", "is inside the source")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    _export_refused(tree / "x", mine, "not part of a Hugging Face model")
    _export_refused(tree / "x", mine, "not empty", overwrite=False)


@pytest.fixture
def read_only_dir(tmp_path):
    """An empty read-only disk (root writes through chmod, not through a read-only mount)."""
    with tmpfs(tmp_path / "ro", "ro,size=64k") as mount:
        yield mount


def test_a_read_only_destination_is_refused_before_reading(source, read_only_dir):
    refused(source, read_only_dir, "is not writable")
    refused(source, read_only_dir / "wide", "cannot create it, .* is not writable")
    _export_refused(source, read_only_dir, "is not writable")
    _export_refused(source, read_only_dir / "hf", "cannot create it")


def test_export_overwrite_replaces_an_earlier_export(source, tmp_path):
    pytest.importorskip("transformers")
    from megaclone.export import export_hf

    out = tmp_path / "hf"
    export_hf(source, out, "llama")
    first = tree_hash(out)
    export_hf(source, out, "llama", overwrite=True)
    assert tree_hash(out) == first


def _garbage(path: Path, keep: float = 0.0) -> None:
    """Replace a file with garbage (keep=0) or cut it to a fraction of its length."""
    if keep:
        with open(path, "r+b") as f:
            f.truncate(int(path.stat().st_size * keep))
    else:
        path.write_bytes(b"\x00garbage{" * 7)


@pytest.mark.parametrize("name, keep", [("metadata.json", 0.0), ("common.pt", 0.5), ("common.pt", 0.0),
                                        (".metadata", 0.0), (".metadata", 0.5)])
def test_a_damaged_checkpoint_file_is_named(source, tmp_path, name, keep):
    src = copy_of(source, tmp_path)
    if not (torch_dist.find_checkpoint(src) / name).exists():
        pytest.skip(f"this megatron-core writes no {name} (its common state is inside the shards)")
    _garbage(torch_dist.find_checkpoint(src) / name, keep)
    err = refused(src, tmp_path / "d", "cannot read|damaged|is missing")
    assert name in str(err)


def test_a_truncated_legacy_file_is_named(tmp_path):
    src = tmp_path / "legacy"
    victim = src / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    victim.parent.mkdir(parents=True)
    torch.save({"model": {}, "args": None, "padding": torch.zeros(1000)}, victim)
    _garbage(victim, 0.5)
    (src / iterations.LATEST).write_text("1")
    err = refused(src, tmp_path / "d", "cannot read")
    assert "model_optim_rng.pt" in str(err)


def test_a_damaged_or_missing_hf_shard_is_named(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2, vocab_size=64)
    hf_dir = tmp_path / "hf"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(hf_dir), max_shard_size="20KB")
    shards = sorted(hf_dir.glob("model-*.safetensors"))
    assert len(shards) >= 2
    _garbage(shards[-1], 0.5)
    err = refused(hf_dir, tmp_path / "d", "cannot read", load_format="hf")
    assert shards[-1].name in str(err)
    shards[-1].unlink()
    err = refused(hf_dir, tmp_path / "d", "is missing", load_format="hf")
    assert shards[-1].name in str(err)


@pytest.mark.parametrize("vocab", [0, 10_000])
def test_vocab_size_outside_the_embedding_is_refused(source, tmp_path, vocab):
    refused(source, tmp_path / "d", "--vocab-size .* is not within the checkpoint's 304 embedding rows",
            vocab_size=vocab)


@pytest.mark.parametrize("flag", ["--finetune", "--use-checkpoint-args"])
def test_trainer_refuses_a_load_without_a_checkpoint_when_it_needs_one(tmp_path, flag):
    """Megatron-LM starts from random weights when --load holds no checkpoint; with a flag that reads
    the checkpoint the trainer refuses instead of training something else."""
    from megaclone.train import args as train_args
    from megaclone.train import loop

    (tmp_path / "README").write_text("not a checkpoint")
    args = train_args.parse_args(["--load", str(tmp_path), flag, "--seq-length", "8", "--micro-batch-size", "1",
                                  "--lr", "1e-4", "--train-iters", "1", "--data-path", str(tmp_path / "data")])
    with pytest.raises(MegacloneError, match=f"{flag} but --load .* holds no checkpoint"):
        loop.prepare_args(args, 1)


def test_trainer_refuses_a_mixture_of_experts_at_tp_2_with_the_reason():
    """megatron-core's MoE layer needs sequence parallelism at TP > 1, which its local-spec norms refuse."""
    from megaclone.train import args as train_args

    args = train_args.parse_args(["--num-experts", "4", "--tensor-model-parallel-size", "2", "--num-layers", "2",
                                  "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "8",
                                  "--micro-batch-size", "1", "--lr", "1e-4", "--train-iters", "1"])
    with pytest.raises(MegacloneError, match="refuse sequence parallelism"):
        train_args.finalize(args, 2)


def test_trainer_refuses_a_mixture_of_experts_with_linear_biases():
    """megatron-core's sequential experts add their bias in place to a custom function's output, which
    torch refuses on the first step (RuntimeError: ... a view and is being modified inplace)."""
    from megaclone.train import args as train_args

    args = train_args.parse_args(["--num-experts", "4", "--num-layers", "2", "--hidden-size", "32",
                                  "--num-attention-heads", "4", "--seq-length", "8", "--micro-batch-size", "1",
                                  "--lr", "1e-4", "--train-iters", "1", "--data-path", "d"])
    with pytest.raises(MegacloneError, match="pass --disable-bias-linear"):
        train_args.finalize(args, 1)
    args = train_args.parse_args(["--num-experts", "4", "--disable-bias-linear", "--num-layers", "2", "--hidden-size",
                                  "32", "--num-attention-heads", "4", "--seq-length", "8", "--micro-batch-size", "1",
                                  "--lr", "1e-4", "--train-iters", "1", "--data-path", "d"])
    train_args.finalize(args, 1)


def test_a_refused_expansion_leaves_no_thread_behind(source, tmp_path):
    """The peak-memory sampler a library call starts stops however the call ends: a caller's process
    (a notebook, a test session) that sees refusals must not accumulate threads reading /proc."""
    import threading

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("a user's file")
    for _ in range(3):
        with pytest.raises(MegacloneError, match="is not empty"):
            expand(source, tmp_path / "full", Factors.uniform(2), 1)
    assert not [t for t in threading.enumerate() if t.name == "megaclone-rss"]


def test_a_layout_the_world_cannot_hold_is_refused_in_one_line(tmp_path):
    """megatron-core's own refusal of a TP larger than the job (a RuntimeError traceback on every rank)
    becomes a MegacloneError naming the processes needed: `megaclone make-source --tp 2` started
    without torchrun writes nothing."""
    from megaclone import sample
    from megaclone.runtime import init_distributed
    from megaclone.shape import presets

    init_distributed("cpu")
    with pytest.raises(MegacloneError, match=r"TP 2 needs a multiple of 2 processes, but this job has 1"):
        sample.make_source(tmp_path / "s", presets.preset_spec("llama", 2), train_steps=0)
    assert not (tmp_path / "s").exists()
