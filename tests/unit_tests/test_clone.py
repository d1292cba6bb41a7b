"""Index maps, partition rules, planner and clone rules against the independent block reference.

No processes or files: every destination rank's slices are computed from in-memory source pieces
(exactly the rows and columns the planner says to read) and reassembled into full tensors.
"""

import dataclasses

import numpy as np
import pytest
import torch
from reference import deepen_reference, expand_reference, zero_sum_violation

from megaclone.pipeline.clone import (
    CloneConfig,
    SourcePiece,
    Variant,
    chunk_sum_of_squares,
    clone_slice,
    noise_scales,
)
from megaclone.pipeline.index_maps import layer_map
from megaclone.pipeline.plan import contiguous_runs, draw_chunks, plan_rank
from megaclone.pipeline.rules import param_rules
from megaclone.shape import presets
from megaclone.shape.request import Depth, Factors, grown_spec


def random_source(spec, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for rule in param_rules(spec, spec):
        shape = ((spec.num_layers,) if rule.per_layer else ()) + rule.src_shape
        out[rule.key] = torch.randn(shape, generator=gen)
    return out


NOISY = ("decoder.layers.self_attention.linear_qkv.weight", "decoder.layers.self_attention.linear_proj.weight",
         "decoder.layers.mlp.linear_fc1.weight", "decoder.layers.mlp.linear_fc2.weight")


def noise_block_rows(key, s):
    """Rows per noise block, as the authors' code clones: q, k and v per head, gate and up apart,
    every other linear as a whole (written out here, independently of megaclone's rules)."""
    if "linear_qkv" in key:
        return s.kv_channels
    if "linear_fc1" in key:
        return s.ffn_hidden_size
    return s.hidden_size


def block_powers(src, s):
    """mean(W_S^2) per noise block of every noisy matrix-layer, from the whole source tensors."""
    out = {}
    for key in NOISY:
        for layer, w in enumerate(src[key]):
            rows = noise_block_rows(key, s)
            out[(key, layer)] = np.array([w[i:i + rows].double().square().mean().item()
                                          for i in range(0, w.shape[0], rows)])
    return out


def scales_of(src, s, d, cfg, depth=Depth()):
    """Every noise block's scale, all chunks summed in this process (expand deals them to ranks)."""
    rules = param_rules(s, d)
    by_key = {r.key: r for r in rules}
    chunks = draw_chunks(rules, d.num_layers)
    sums = {c.index: chunk_sum_of_squares(by_key[c.key], c, cfg) for c in chunks}
    src_layer_of, _ = layer_map(depth, s.num_layers)(np.arange(d.num_layers))
    return noise_scales(rules, chunks, sums, block_powers(src, s), src_layer_of, cfg)


def clone_all(src, s, d, cfg, tp, depth=Depth()):
    """Full destination tensors assembled from every rank's slices, each from its planned reads only."""
    rules = param_rules(s, d)
    scales = scales_of(src, s, d, cfg, depth) if cfg.variant.noisy else {}
    dtype = next(iter(src.values())).dtype
    dst = {r.key: torch.full(((d.num_layers,) if r.per_layer else ()) + r.dst_shape, float("nan"), dtype=dtype)
           for r in rules}
    for rank in range(tp):
        for task in plan_rank(rules, layer_map(depth, s.num_layers), tp, rank, depth.zeroes_added_outputs):
            target = dst[task.rule.key] if task.layer is None else dst[task.rule.key][task.layer]
            if task.zero:
                assert len(task.src_rows) == 0 and task.box_read.numel == 0
                target[np.ix_(task.dst_rows, task.dst_cols) if task.dst_cols is not None else task.dst_rows] = 0
                continue
            full = src[task.rule.key] if task.layer is None else src[task.rule.key][task.src_layer]
            # read exactly the planned grid boxes, nothing else
            covered = [i for o, n in contiguous_runs(task.src_rows) for i in range(o, o + n)]
            assert covered == list(task.src_rows)
            data = full[torch.as_tensor(task.src_rows, dtype=torch.long)]
            if task.src_cols is not None:
                data = data[:, torch.as_tensor(task.src_cols, dtype=torch.long)]
            piece = SourcePiece(data, task.src_rows, task.src_cols)
            shape = (len(task.dst_rows),) + (() if task.dst_cols is None else (len(task.dst_cols),))
            # odd ranks compute in place into a preallocated shard, as the expander does
            out = torch.full(shape, float("nan"), dtype=dtype) if rank % 2 else None
            values = clone_slice(task.rule, task.layer or 0, piece, task.dst_rows, task.dst_cols, cfg, out=out,
                                 scale=scales.get((task.rule.key, task.layer)))
            if task.dst_cols is None:
                target[torch.as_tensor(task.dst_rows)] = values
            else:
                target[np.ix_(task.dst_rows, task.dst_cols)] = values
    return dst


CASES = [("llama", Factors(2, 2, 2), 4), ("gpt2", Factors(2, 2, 2), 2), ("llama", Factors(3, 3, 3), 3),
         ("gpt2", Factors(3, 3, 3), 8), ("llama", Factors(2, 1, 3), 2), ("gpt2", Factors(1, 2, 1), 4)]


@pytest.mark.parametrize("preset,factors,tp", CASES)
@pytest.mark.parametrize("variant", ["symmetric", "diagonal"])
def test_exact_variants_match_block_reference(preset, factors, tp, variant):
    s = presets.preset_spec(preset, 1)
    d = grown_spec(s, factors, tp)
    src = random_source(s)
    got = clone_all(src, s, d, CloneConfig(Variant(variant)), tp)
    ref = expand_reference(src, s, d, variant)
    assert set(got) == set(ref)
    for key in ref:
        assert got[key].shape == ref[key].shape, key
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("preset,factors,depth,tp", [
    ("llama", Factors(2, 2, 2), Depth(2), 4),
    ("gpt2", Factors(1, 1, 1), Depth(3, "identity", "top"), 2),
    ("gpt2", Factors(2, 2, 2), Depth(2, "stack", "interleave"), 1),
    ("llama", Factors(1, 1, 1), Depth(3, "stack", "top"), 2),
])
@pytest.mark.parametrize("variant", ["symmetric", "diagonal"])
def test_depth_growth_matches_the_layer_by_layer_reference(preset, factors, depth, tp, variant):
    s = presets.preset_spec(preset, 1)
    d = grown_spec(s, factors, tp, depth)
    assert d.num_layers == s.num_layers * depth.factor
    src = random_source(s)
    got = clone_all(src, s, d, CloneConfig(Variant(variant)), tp, depth)
    wide = expand_reference(src, s, grown_spec(s, factors, tp), variant)
    ref = deepen_reference(wide, s.num_layers, depth.factor, depth.placement, depth.init)
    assert set(got) == set(ref)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0, msg=key)


def test_noisy_depth_copies_read_their_source_layers_power_and_draw_their_own_noise():
    """Noise is keyed by the destination layer (copies of one source layer get different, still
    zero-sum, noise) at the power of the source layer they copy."""
    s = presets.preset_spec("llama", 1)
    src = random_source(s, seed=4)
    depth = Depth(2, "stack")
    d = grown_spec(s, Factors.uniform(2), 2, depth)
    got = clone_all(src, s, d, CloneConfig(Variant.NOISY_SYMMETRIC, seed=5), 2, depth)
    base = deepen_reference(expand_reference(src, s, grown_spec(s, Factors.uniform(2), 2), "symmetric"),
                            s.num_layers, 2, "interleave", "stack")
    for key in NOISY:
        assert zero_sum_violation(got[key], base[key], 1, 2) < 1e-5, key
        assert not torch.equal(got[key][0], got[key][1]), f"{key}: both copies of layer 0 drew the same noise"


WIDE = dict(num_layers=1, hidden_size=256, num_attention_heads=4, num_query_groups=2, kv_channels=64,
            ffn_hidden_size=512)


@pytest.mark.parametrize("factor", [2, 3])
@pytest.mark.parametrize("variant", ["noisy-symmetric", "noisy-diagonal"])
def test_noise_is_the_authors_paired_layout_free_and_exactly_of_the_requested_snr_per_block(variant, factor):
    """The authors' layout (input blocks 2p and 2p+1 get +N and -N, an odd last block none), each
    (head or matrix, output copy, input copy) block at the requested SNR against the cloned block
    W_S/c to within 1e-3 dB (fp32 rounding of the stored sum; the authors' code renormalizes each block
    the same way), identical at TP 1 and 2, and another seed draws other noise."""
    s = presets.preset_spec("llama", 1, **WIDE)
    factors = Factors.uniform(factor)
    src = random_source(s, seed=3)
    cfg = CloneConfig(Variant(variant), snr_db=10.0, seed=11)
    by_tp = {tp: clone_all(src, s, grown_spec(s, factors, tp), cfg, tp) for tp in (1, 2)}
    for key in by_tp[1]:
        if "embedding" not in key and "output_layer" not in key:  # padded vocab differs with TP
            assert torch.equal(by_tp[1][key], by_tp[2][key]), f"{key} differs between TP 1 and TP 2"
    base = expand_reference(src, s, grown_spec(s, factors, 1), variant.removeprefix("noisy-"))
    noisy_keys = [k for k in base if not torch.equal(base[k], by_tp[1][k])]
    assert sorted(noisy_keys) == sorted(NOISY), "noise on exactly the cloned linears, none on the output layer"
    measured = []
    for key in NOISY:
        got, ref, w = by_tp[1][key][0], base[key][0], src[key][0]
        rows, (out_rows, in_cols) = noise_block_rows(key, s), w.shape
        delta = (got - ref).double()
        for bo in range(factor):  # every (output copy, input copy) of every noise block
            for r in range(0, out_rows, rows):
                if "linear_fc1" in key:  # [gate; up], each half tiled on its own
                    half, within = divmod(r, s.ffn_hidden_size)
                    d_rows = half * factor * s.ffn_hidden_size + bo * s.ffn_hidden_size + within
                else:  # fused QKV: whole query groups tiled, copy bo after all source groups
                    d_rows = bo * out_rows + r
                blocks = [delta[d_rows:d_rows + rows, bi * in_cols:(bi + 1) * in_cols] for bi in range(factor)]
                signal = (w[r:r + rows] / factor).double().square().mean()
                for p in range(factor // 2):
                    torch.testing.assert_close(blocks[2 * p], -blocks[2 * p + 1], rtol=0, atol=1e-6)
                    for noise in blocks[2 * p:2 * p + 2]:
                        measured.append(10 * torch.log10(signal / noise.square().mean()).item())
                if factor % 2:
                    assert blocks[-1].abs().max() == 0, f"{key}: the odd last input copy carries no noise"
    assert len(measured) == factor * 2 * (factor // 2) * (8 + 2 + 1 + 1)  # q, k, v heads; halves; proj; fc2
    assert all(abs(snr - 10.0) < 1e-3 for snr in measured), sorted(measured)[:3] + sorted(measured)[-3:]
    other_seed = clone_all(src, s, grown_spec(s, factors, 1), dataclasses.replace(cfg, seed=12), 1)
    assert not torch.equal(other_seed[NOISY[2]], by_tp[1][NOISY[2]])


def test_diagonal_applies_only_where_both_axes_grow_by_one_factor():
    """Paper section 3.4: the output layer (vocabulary rows do not grow) and matrices whose two axes
    grow by different factors are cloned symmetrically under the diagonal variants."""
    s = presets.preset_spec("llama", 1)
    src = random_source(s)
    d = grown_spec(s, Factors(2, 2, 2), 2)
    diag = clone_all(src, s, d, CloneConfig(Variant.DIAGONAL), 2)
    sym = expand_reference(src, s, d, "symmetric")
    torch.testing.assert_close(diag["output_layer.weight"], sym["output_layer.weight"], rtol=0, atol=0)
    assert not torch.equal(diag[NOISY[0]], sym[NOISY[0]])
    d = grown_spec(s, Factors(2, 1, 3), 2)  # hidden 2x, heads 1x, FFN 3x: no matrix grows equally on both axes
    diag = clone_all(src, s, d, CloneConfig(Variant.DIAGONAL), 2)
    sym = expand_reference(src, s, d, "symmetric")
    for key in sym:
        torch.testing.assert_close(diag[key], sym[key], rtol=0, atol=0, msg=key)


def test_bf16_symmetric_power_of_two_is_bit_exact():
    s = presets.preset_spec("llama", 1)
    d = grown_spec(s, Factors.uniform(2), 2)
    src = {k: v.to(torch.bfloat16) for k, v in random_source(s).items()}
    got = clone_all(src, s, d, CloneConfig(), 2)
    ref = expand_reference({k: v.float() for k, v in src.items()}, s, d, "symmetric")
    for key in ref:
        assert got[key].dtype == torch.bfloat16
        assert torch.equal(got[key].float(), ref[key]), key


@pytest.mark.parametrize("variant", ["symmetric", "diagonal"])
def test_bf16_any_factor_is_the_fp32_clone_rounded_once(variant):
    """Factor 3 (and unequal factors) in bf16: every slice, computed in place in bf16 (odd ranks) or
    widened to fp32 (even ranks), equals the fp32 reference clone rounded once to bf16."""
    s = presets.preset_spec("llama", 1)
    for factors in (Factors.uniform(3), Factors(2, 1, 3)):
        d = grown_spec(s, factors, 3 if factors.hidden == 3 else 2)
        src = {k: v.to(torch.bfloat16) for k, v in random_source(s).items()}
        got = clone_all(src, s, d, CloneConfig(variant=Variant(variant)), d.tensor_parallel)
        ref = expand_reference({k: v.float() for k, v in src.items()}, s, d, variant)
        for key in ref:
            assert torch.equal(got[key].float(), ref[key].bfloat16().float()), (factors, key)  # -0.0 == 0.0


def test_runs_cover_indices_exactly():
    rng = np.random.default_rng(0)
    for _ in range(200):
        idx = np.unique(rng.integers(0, 97, size=rng.integers(1, 60)))
        runs = contiguous_runs(idx)
        assert [i for off, n in runs for i in range(off, off + n)] == list(idx)
        assert all(a + n < b for (a, n), (b, _) in zip(runs, runs[1:]))  # maximal: gaps between runs
    assert contiguous_runs(np.arange(13, 50)) == [(13, 37)]
    assert contiguous_runs(np.array([], dtype=np.int64)) == []

