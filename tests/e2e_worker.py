"""The end-to-end matrix, run inside ONE torchrun process group (4 ranks) to pay start-up once.

For each architecture: a trained source saved at TP 1 and resharded to TP 2; each (factor, variant)
group is expanded by the library at the destination TPs of :func:`layouts` (other ranks act as
data-parallel replicas) and verified per rank against the source's logits at TP 4 (its last rank holds only
vocabulary padding). Rank 0 then checks the gathered destinations: bit-identical across layouts and
reruns, equal to an independent block-algebra reference (exact variants), zero-sum noise of the right
power (noisy variants). Results go to JSON.

The variants differ only in the values the clone rules compute, which test_clone.py checks per rank
at TP 1, 2 and 4 in one process; here every variant runs at TP 4 once, and the layout axis (source TP
1 and 2, destination TP 2 and 4) is crossed with the symmetric and noisy-diagonal variants only. Four
ranks, not eight: on a 2-core machine eight ranks cost twice the time and prove nothing more (a TP 4
rank already holds a fraction of a head group, a factor-3 block and a padding-only vocabulary slice).

    torchrun --nproc_per_node 4 tests/workers.py OUT_DIR e2e
"""

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megaclone import sample  # noqa: E402

from megaclone.shape import presets  # noqa: E402
from megaclone.pipeline.clone import CloneConfig, Variant  # noqa: E402
from megaclone.pipeline.expand import expand  # noqa: E402
from megaclone.model import build_gpt, load_model  # noqa: E402
from megaclone.runtime import init_distributed, init_parallel  # noqa: E402
from megaclone.shape.request import Factors  # noqa: E402
from megaclone.shape.spec import ModelSpec, pad_vocab
from megaclone.check.logits import verify  # noqa: E402
from reference import expand_reference, zero_sum_violation  # noqa: E402

VARIANTS = [v.value for v in Variant]
FACTORS = (2, 3)
ACROSS_LAYOUTS = ("symmetric", "noisy-diagonal")
WIDEST = 4  # the destination TP verified: every rank of the job


def layouts(factor: int, variant: str) -> list[tuple[int, int]]:
    """(source TP, destination TP) pairs a group runs; the last is the verified one (TP 4)."""
    if variant not in ACROSS_LAYOUTS:
        return [(2, WIDEST)]
    src_tps = (1, 2) if factor == 2 and variant == "symmetric" else (2,)
    return [(s, d) for s in src_tps for d in (2, WIDEST)]


def plain_tensors(path: Path) -> dict[str, torch.Tensor]:
    from megatron.core import dist_checkpointing

    from megaclone.formats import torch_dist

    loaded = dist_checkpointing.load_plain_tensors(str(torch_dist.find_checkpoint(path)))
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def digest(tensors: dict[str, torch.Tensor], vocab_size: int) -> str:
    """sha256 over every tensor; vocab-sized tensors are cut to the real vocab, since their padding
    rows (zeros) legitimately vary with the destination TP."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            t = t[:vocab_size]
        h.update(key.encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def reshard_source(src1: Path, dst: Path, spec1: ModelSpec, tp: int) -> ModelSpec:
    """Re-save the TP-1 source at TP ``tp`` through megatron-core itself (vocab re-padded), the way
    Megatron-LM training would after loading it at another TP."""
    spec = dataclasses.replace(spec1, tensor_parallel=tp,
                               padded_vocab_size=pad_vocab(spec1.vocab_size, spec1.make_vocab_size_divisible_by, tp))
    init_parallel(tp)
    model = build_gpt(spec)
    load_model(model, src1 / "iter_0000002")
    sample.save_like_megatron_lm(model, sample.checkpoint_args(spec), dst, iteration=2)
    return spec


def main(out: Path) -> None:
    rt = init_distributed()
    archs = ["llama", "gpt2"]
    cases, groups, notes = [], [], {}
    t_start = time.time()
    for arch in archs:
        spec1 = presets.preset_spec(arch, 1)
        sources = {1: out / f"{arch}-src-tp1"}
        sample.make_source(sources[1], spec1, train_steps=2)
        sources[2] = out / f"{arch}-src-tp2"
        reshard_source(sources[1], sources[2], spec1, 2)
        # the resharded source computes the same function as the original
        res = verify(sources[1], sources[2], tol=1e-5)
        notes[f"{arch}-reshard-max-rel"] = max(r.max_rel for r in res)
        src_plain = plain_tensors(sources[1])

        for factor in FACTORS:
            for variant in VARIANTS:
                digests, ref_diff = {}, None
                for src_tp, dst_tp in layouts(factor, variant):
                    dst = out / f"{arch}-f{factor}-{variant}-s{src_tp}-d{dst_tp}"
                    t0 = time.time()
                    reports = expand(sources[src_tp], dst, Factors.uniform(factor), dst_tp,
                                     CloneConfig(Variant(variant), seed=7), overwrite=True)
                    t1 = time.time()
                    # logits at the widest layout (a padding-only rank); the others are
                    # bit-identical to it (digests below), so they compute the same logits
                    res = verify(sources[src_tp], dst) if dst_tp == WIDEST else None
                    cases.append(dict(arch=arch, factor=factor, variant=variant, src_tp=src_tp, dst_tp=dst_tp,
                                      max_rel=res and max(r.max_rel for r in res),
                                      max_abs=res and max(r.max_abs for r in res),
                                      ranks=len(reports), expand_s=t1 - t0, verify_s=time.time() - t1,
                                      bytes_read=[r.bytes_read for r in reports]))
                    plain = plain_tensors(dst)
                    digests[f"s{src_tp}-d{dst_tp}"] = digest(plain, spec1.vocab_size)
                    if rt.is_main and ref_diff is None:
                        ref_diff, extra = check_against_reference(src_plain, plain, spec1, factor, variant, dst_tp)
                    if dst_tp != WIDEST or src_tp != 2:
                        import shutil
                        dist.barrier()
                        if rt.is_main:
                            shutil.rmtree(dst)
                group = dict(arch=arch, factor=factor, variant=variant, digests=digests)
                if rt.is_main:
                    group.update(ref_max_diff=ref_diff, **extra)
                groups.append(group)

    # rerun: same seed, same bytes; another seed, other noise
    arch, variant, factor = "llama", "noisy-symmetric", 2
    rerun = {}
    for seed in (7, 7, 8):
        dst = out / f"rerun-{seed}"
        expand(out / f"{arch}-src-tp2", dst, Factors.uniform(factor), 4, CloneConfig(Variant(variant), seed=seed),
               overwrite=True)
        rerun.setdefault(str(seed), []).append(digest(plain_tensors(dst), 300))
    # the verifier must fail on a checkpoint that is not a clone of the source
    other = out / "llama-other-src"
    sample.make_source(other, presets.preset_spec("llama", 2), seed=99, train_steps=1)
    expand(other, out / "llama-other-wide", Factors.uniform(2), 4, overwrite=True)
    res = verify(out / "llama-src-tp2", out / "llama-other-wide")
    notes["non-clone-max-rel"] = max(r.max_rel for r in res)
    notes["non-clone-all-ok"] = all(r.ok for r in res)
    if rt.is_main:
        (out / "results.json").write_text(json.dumps(
            dict(cases=cases, groups=groups, notes=notes, rerun=rerun, seconds=time.time() - t_start), indent=1))
    dist.barrier()


def check_against_reference(src, dst, spec1, factor, variant, dst_tp):
    """Max |megaclone - reference| over all tensors (exact variants) or noise checks (noisy ones)."""
    from megaclone.shape.request import grown_spec

    s = spec1
    d = grown_spec(s, Factors.uniform(factor), dst_tp)
    base_variant = "diagonal" if "diagonal" in variant else "symmetric"
    ref = expand_reference(src, s, d, base_variant)
    missing = sorted(set(ref) ^ {k for k in dst if not k.endswith("_extra_state")})
    assert not missing, f"key mismatch: {missing}"
    if not variant.startswith("noisy"):
        return max((dst[k].double() - ref[k].double()).abs().max().item() for k in ref), {}
    # noisy: only matrices with a grown input differ; the difference is zero-sum over input blocks
    extra = {"zero_sum_max": 0.0, "noise_power_ratio": {}}
    diff_max = 0.0
    for key in ref:
        delta = (dst[key].double() - ref[key].double())
        if "weight" in key and delta.abs().max() > 0 and dst[key].dim() >= 2 and "embedding" not in key:
            c_in = factor
            extra["zero_sum_max"] = max(extra["zero_sum_max"], zero_sum_violation(dst[key], ref[key], 1, c_in))
            base = src[key].double()
            # the noise power is the cloned block's, mean((W_S / c_in)^2), over 10^(10 dB / 10)
            extra["noise_power_ratio"][key] = (delta.square().mean() / (base.square().mean() / c_in**2 / 10.0)).item()
        else:
            diff_max = max(diff_max, delta.abs().max().item())
    return diff_max, extra

