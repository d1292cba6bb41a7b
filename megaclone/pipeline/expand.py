"""The expansion job: every rank reads the source boxes its slices need, clones them, writes its shard.

Order of a run (all ranks together):
1. read and validate the source (args, stored shapes, shard files) and the request, before writing;
2. build the destination GPTModel for this rank without initializing it (its shard is the only
   large allocation), fill it parameter by parameter from source boxes;
3. save with dist_checkpointing, then, once every rank has finished, publish
   ``latest_checkpointed_iteration.txt``. A crash before that leaves no checkpoint that looks complete.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from megaclone.errors import MegacloneError
from megaclone.formats import Format, destination
from megaclone.formats.base import Source
from megaclone.formats.source import open_source
from megaclone.memory import PeakMemory
from megaclone.model import (
    RowBlock,
    Slots,
    build_gpt,
    model_sharded_state_dict,
    parameter_slots,
    save_megatron,
)
from megaclone.pipeline.clone import (
    CloneConfig,
    SourcePiece,
    chunk_sum_of_squares,
    clone_slice,
    noise_scales,
    router_slice,
)
from megaclone.pipeline.index_maps import layer_map
from megaclone.pipeline.plan import SliceTask, draw_chunks, plan_rank, power_chunks
from megaclone.pipeline.optimizer import (
    adam_scaling,
    check_growable,
    continuation,
    grown_adam_state,
    mixed_precision,
)
from megaclone.pipeline.rules import ParamRule, Role, param_rules
from megaclone.runtime import (
    agree,
    cpu_seconds,
    gathered,
    return_large_frees,
    trim_heap,
)
from megaclone.shape.request import Depth, Factors, check_divisible, grown_spec
from megaclone.shape.spec import Experts, ModelSpec
from megaclone.stopping import FAULT_ENV, fault_point

def _fault_while_writing() -> None:
    """"writing:<rank>": the writers dist_checkpointing forks for that rank stop themselves at once
    (stuck on a queue or a filesystem), and once they are stopped the rank is SIGKILLed. The stop is an
    at-fork hook registered after runtime's own, so it runs after the child was bound to its parent."""
    if os.environ.get(FAULT_ENV) != f"writing:{dist.get_rank()}":
        return
    import threading

    import psutil

    os.register_at_fork(after_in_child=lambda: os.kill(os.getpid(), signal.SIGSTOP))

    def watch():
        me = psutil.Process()
        while not (writers := me.children()) or any(w.status() != psutil.STATUS_STOPPED for w in writers):
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


@dataclass
class RankReport:
    """What one rank did; rank 0 gathers them for the summary."""

    rank: int
    slices: int = 0
    bytes_read: int = 0
    bytes_computed: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss: dict[str, int] = field(default_factory=dict)


def destination_spec(source: Source, factors: Factors, tp: int, depth: Depth = Depth(),
                     experts: Optional[Experts] = None, expert_parallel: int = 1) -> ModelSpec:
    dst = grown_spec(source.spec, factors, tp, depth, experts, expert_parallel)
    check_divisible(dst)
    return dst


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def assemble_piece(task: SliceTask, parts: list[torch.Tensor], dtype: torch.dtype) -> SourcePiece:
    """The source values a slice needs, from its boxes as read (``task.box_read`` order)."""
    grid = task.boxes
    if not grid:
        width = () if task.src_cols is None else (len(task.src_cols),)
        return SourcePiece(torch.empty((0,) + width, dtype=dtype), task.src_rows, task.src_cols)
    if task.rule.source_experts:  # drop the leading expert axis of each box
        parts = [p.reshape(p.shape[1:]) for p in parts]
    it = iter(parts)
    data = _cat([_cat([next(it) for _ in row], dim=-1) for row in grid], dim=0)
    return SourcePiece(data, task.src_rows, task.src_cols)


def _check_blocks(task: SliceTask, blocks: list[RowBlock]) -> None:
    width = () if task.dst_cols is None else (len(task.dst_cols),)
    stops = [0] + [b.stop for b in blocks]
    if any(b.start != stop or tuple(b.tensor.shape) != (b.stop - b.start,) + width
           for b, stop in zip(blocks, stops)) or stops[-1] != len(task.dst_rows):
        raise AssertionError(f"{task.rule.key}: the model's shard "
                             f"{[tuple(b.tensor.shape) for b in blocks]} is not the planned slice")


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in ``t``: its max and min (which NaN propagates to) are finite. A twentieth
    of ``isfinite(t).all()``'s time on CPU, where that was most of an expansion's read phase in bf16."""
    return t.numel() == 0 or bool(torch.isfinite(t.amax())) and bool(torch.isfinite(t.amin()))


def _check_finite(task: SliceTask, parts: list[torch.Tensor]) -> None:
    """Refuse NaN or infinite source values, naming the stored tensor (a weight, or an Adam moment:
    ``optimizer.state.exp_avg.<key>``); a second moment must also be non-negative."""
    where = task.rule.source_key + ("" if task.layer is None else f" (layer {task.layer})")
    if task.rule.optimizer_state == "exp_avg_sq":
        negative = sum(int((p < 0).sum()) for p in parts if p.is_floating_point())
        if negative:
            raise MegacloneError(f"the source's {where} holds {negative} negative values; Adam's second moment is a "
                                 "running mean of squares, never negative", "the optimizer state is damaged: use an "
                                 "earlier checkpoint, or grow without --grow-optimizer")
    if all(_all_finite(p) for p in parts if p.is_floating_point()):
        return
    bad = sum(int((~torch.isfinite(p)).sum()) for p in parts if p.is_floating_point())  # for the message
    raise MegacloneError(f"the source's {where} holds {bad} NaN or infinite values in the part this rank reads",
                         "the source is damaged or diverged: use an earlier checkpoint, or pass "
                         "--allow-non-finite to copy the values as they are")


def _dealt_sums(chunks: list, sum_of: Callable) -> dict[int, float]:
    """Every chunk's float64 sum by chunk index, on every rank: each rank computes its round-robin
    share (chunks are numbered in an order that depends on the model only) and the shares are
    exchanged, so callers add them exactly and every layout gets the same totals."""
    mine = {chunk.index: sum_of(chunk) for chunk in chunks[dist.get_rank()::dist.get_world_size()]}
    return {index: value for share in gathered(mine) for index, value in share.items()}


def signal_powers(source: Source, rules: list, num_layers: int) -> dict[tuple[str, Optional[int]], np.ndarray]:
    """Mean of W_S^2 per noise block of every noisy source matrix-layer (all ranks together): each
    rank reads and sums its round-robin share of :func:`plan.power_chunks`, the sums are exchanged and
    added exactly, so every rank and every layout gets identical powers."""
    chunks = power_chunks(rules, num_layers)

    def sum_of_squares(chunk) -> float:
        [part] = source.read(chunk.read)
        return float(part.double().square().sum())

    sums = _dealt_sums(chunks, sum_of_squares)
    rules_by_key = {r.source_key: r for r in rules}
    blocks: dict[tuple[str, Optional[int]], list[list[float]]] = {}
    for chunk in chunks:
        rule = rules_by_key[chunk.read.key]
        per_layer = blocks.setdefault((rule.source_key, chunk.read.layer), [[] for _ in range(rule.noise_blocks)])
        per_layer[chunk.block].append(sums[chunk.index])
    return {(key, layer): np.array([math.fsum(b) for b in per_block])
            / (rules_by_key[key].noise_unit * rules_by_key[key].src_shape[1])
            for (key, layer), per_block in blocks.items()}


def noise_plan(source: Source, dst_spec: ModelSpec, depth: Depth, cfg: CloneConfig,
               rules: list[ParamRule]) -> dict[tuple[str, int], np.ndarray]:
    """The scale of every noise block of the destination (clone.noise_scales), all ranks together:
    the source's block powers (:func:`signal_powers`), then each rank's round-robin share of the
    draws' sums of squares (plan.draw_chunks), exchanged and added exactly, so every rank and every
    layout scales the noise identically and each block meets the requested SNR exactly. ``rules``: the
    run's clone rules (param_rules, built once a run)."""
    powers = signal_powers(source, rules, source.spec.num_layers)
    chunks = draw_chunks(rules, dst_spec.num_layers)
    by_key = {r.key: r for r in rules}
    sums = _dealt_sums(chunks, lambda c: chunk_sum_of_squares(by_key[c.key], c, cfg))
    src_layer_of, _ = layer_map(depth, source.spec.num_layers)(np.arange(dst_spec.num_layers))
    return noise_scales(rules, chunks, sums, powers, src_layer_of, cfg)


@dataclass(frozen=True)
class Growth:
    """What every slice of one run is computed from, fixed before the first is: the source, the
    destination's shape, the clone settings and depth map, the clone rules (or an optimizer state's
    rules, :func:`for_state`) and the noise plan. Values that are not finite are refused unless
    ``allow_non_finite`` (which is about weights: an optimizer state is always checked)."""

    source: Source
    dst_spec: ModelSpec
    cfg: CloneConfig
    depth: Depth
    rules: list[ParamRule]
    scales: Optional[dict[tuple[str, int], np.ndarray]] = None
    allow_non_finite: bool = False
    zero_added_layers: bool = False  # every tensor of a layer added by identity depth growth is zero (moments)


def plan_growth(source: Source, dst_spec: ModelSpec, cfg: CloneConfig, depth: Depth = Depth(),
                allow_non_finite: bool = False) -> Growth:
    """The run's clone rules, built once, and its noise plan (a collective: every rank calls it)."""
    rules = param_rules(source.spec, dst_spec)
    scales = noise_plan(source, dst_spec, depth, cfg, rules) if cfg.variant.noisy else None
    return Growth(source, dst_spec, cfg, depth, rules, scales, allow_non_finite)


def for_state(growth: Growth, rules: list[ParamRule]) -> Growth:
    """The growth of an optimizer state by its own ``rules``: a layer added as an identity gets zeros."""
    return dataclasses.replace(growth, rules=rules, zero_added_layers=growth.depth.zeroes_added_outputs)


def fill_rank(growth: Growth, slots: Slots, report: RankReport, tp_rank: int = 0, ep_rank: int = 0,
              on_slice: Optional[Callable[[SliceTask, int], None]] = None, only_slots: bool = False) -> None:
    """Compute every destination slice this rank owns into its row blocks (model.parameter_slots),
    one task at a time: read its source boxes (locally, no collective; once for consecutive tasks
    that read the same boxes, as a layer's experts do), clone, release. With ``only_slots`` the rank
    computes only the (tensor, layer, expert) pieces ``slots`` holds (a share dealt to it), else every
    piece its TP and EP rank own must have a slot."""
    source, dst_spec, cfg, depth = growth.source, growth.dst_spec, growth.cfg, growth.depth
    slots = dict(slots)
    layers = layer_map(depth, source.spec.num_layers)
    router_std = 0.0 if dst_spec.experts is None or dst_spec.experts.router_init == "zero" else _init_std(source)
    last: tuple = (None, None)  # (BoxRead, SourcePiece) of the last task that read the source
    for task in plan_rank(growth.rules, layers, dst_spec.tensor_parallel, tp_rank, depth.zeroes_added_outputs,
                          dst_spec.expert_parallel, ep_rank, growth.zero_added_layers):
        place = (task.rule.key, task.layer, task.expert)
        if only_slots and place not in slots:
            continue
        blocks = slots.pop(place)
        _check_blocks(task, blocks)
        t0 = time.perf_counter()
        box_read = task.box_read
        t1 = t0
        with torch.no_grad():
            if task.zero:  # a residual output of a layer added by identity depth growth: nothing to read
                for b in blocks:
                    b.tensor.zero_()
            elif task.rule.role is Role.ROUTER:  # a new router: drawn, not read
                for b in blocks:
                    router_slice(task.rule, task.layer or 0, task.dst_rows[b.start:b.stop], task.dst_cols, cfg,
                                 router_std, out=b.tensor)
            else:
                if box_read != last[0]:  # the experts of a layer, or the copies of a source layer, read alike
                    last = (None, None)  # the previous piece goes before the next is read
                    source_dtype = source.tensors[task.rule.source_key].dtype
                    parts = source.read(box_read)
                    if not growth.allow_non_finite or task.rule.optimizer_state:
                        _check_finite(task, parts)
                    last = (box_read, assemble_piece(task, parts, source_dtype))
                    del parts
                    report.bytes_read += box_read.numel * source_dtype.itemsize
                t1 = time.perf_counter()
                scale = (growth.scales or {}).get((task.rule.key, task.layer))
                for b in blocks:
                    clone_slice(task.rule, task.layer or 0, last[1], task.dst_rows[b.start:b.stop], task.dst_cols,
                                cfg, out=b.tensor, scale=scale)
        t2 = time.perf_counter()
        report.slices += 1
        if report.slices == 1:
            fault_point("read")
        shard_bytes = task.dst_numel * blocks[0].tensor.element_size()
        report.bytes_computed += shard_bytes
        report.seconds["read"] = report.seconds.get("read", 0.0) + t1 - t0
        report.seconds["compute"] = report.seconds.get("compute", 0.0) + t2 - t1
        if on_slice is not None:
            on_slice(task, shard_bytes)
    if slots:
        raise AssertionError(f"destination parameters without a clone rule: {sorted(k for k, _, _ in slots)}")


def _init_std(source: Source) -> float:
    """The source's weight init std (Megatron-LM's --init-method-std, 0.02 by default): a new router's."""
    return float(getattr(source.args, "init_method_std", None) or 0.02)


@dataclass(frozen=True)
class Request:
    """What one expansion is asked for: :func:`expand`'s arguments less the paths and the hooks."""

    factors: Factors
    tp: int
    cfg: CloneConfig
    depth: Depth
    experts: Optional[Experts]  # upcycling (or more experts from a mixture)
    expert_parallel: int  # an MoE source's destination EP (upcycling: experts.parallel)
    dtype: Optional[torch.dtype]
    pp: int
    save_format: Format
    vocab_size: Optional[int]
    load_format: Optional[Format | str]
    allow_non_finite: bool
    grow_optimizer: bool
    restart_schedule: bool = False  # with grow_optimizer: the clone starts at iteration 0, its moments kept

    @property
    def ep(self) -> int:
        return self.experts.parallel if self.experts else self.expert_parallel

    @property
    def legacy(self) -> bool:
        return self.save_format is Format.LEGACY


def expand(
    src_root: str | Path,
    dst_root: str | Path,
    factors: Factors,
    tp: int,
    cfg: CloneConfig = CloneConfig(),
    overwrite: bool = False,
    vocab_size: Optional[int] = None,
    device: torch.device = torch.device("cpu"),
    on_slice: Optional[Callable[[SliceTask, int], None]] = None,
    load_format: Optional[Format | str] = None,
    dtype: Optional[torch.dtype] = None,
    pp: int = 1,
    save_format: Format | str = Format.TORCH_DIST,
    allow_non_finite: bool = False,
    depth: Depth = Depth(),
    experts: Optional[Experts] = None,
    grow_optimizer: bool = False,
    expert_parallel: int = 1,
    restart_schedule: bool = False,
) -> list[RankReport]:
    """Expand ``src_root`` into ``dst_root`` at TP ``tp`` (and ``depth``; with ``experts``, every MLP
    upcycled to a mixture of experts over ``experts.parallel`` EP ranks); returns every rank's report
    (on every rank).

    The destination keeps the source's dtype unless ``dtype`` is given (values are computed in fp32,
    or fp64 for an fp64 source, and rounded once). torch_dist keys are global, so the bytes do not
    depend on the pipeline size; ``pp`` is recorded in the args (Megatron-LM's --use-checkpoint-args
    takes it from there) after checking that it divides the layers.

    The world may hold several TP groups (data-parallel replicas): each computes the same shard and
    megatron-core writes only the main replica. With experts, ranks are arranged as megatron-core does
    (TP x EP x DP): each computes and writes only its own experts.

    An MoE source keeps its experts, each grown in width like a dense MLP (its router's input columns
    cloned), over ``expert_parallel`` EP ranks.

    With ``grow_optimizer`` a training checkpoint's Adam moments are grown with the weights and saved
    in the trainer's layout, the step count kept (pipeline.optimizer), and the clone continues the
    source's run (its iteration, samples and learning-rate schedule); with ``restart_schedule`` too it
    starts at iteration 0 instead, with no schedule state, so the trainer resumes it (the grown moments
    loaded) on a new schedule from its flags.
    """
    from megatron.core import parallel_state

    from megaclone.runtime import init_parallel

    req = Request(factors, tp, cfg, depth, experts, expert_parallel, dtype, pp, Format(save_format), vocab_size,
                  load_format, allow_non_finite, grow_optimizer, restart_schedule)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    return_large_frees()
    memory = PeakMemory().start()
    try:
        dst_root, src_root = Path(dst_root), Path(src_root)
        source, dst_spec, adam_step = agree(lambda: validate_request(req, src_root))
        if dist.get_rank() == 0:
            for warning in cfg.warnings(getattr(source.args, "hidden_dropout", None),
                                        getattr(source.args, "attention_dropout", None)):
                print(f"warning: {warning}", file=sys.stderr, flush=True)
        claim = destination.Claim.take(dst_root, destination.Kind.MEGATRON, [src_root, source.path], overwrite)
        with claim:
            report = RankReport(rank=dist.get_rank())
            report.seconds["validate"] = time.perf_counter() - start
            t0 = time.perf_counter()
            init_parallel(tp, 1, req.ep)
            dtype = dtype or source.dtype
            model = build_gpt(dst_spec, dtype=dtype, device=device)
            model_sd = model_sharded_state_dict(model)
            # the model's own tensors, when the grown optimizer state is keyed to them
            slots = parameter_slots(model_sd, own_storage=not req.legacy and not grow_optimizer)
            if not req.legacy and not grow_optimizer:
                del model  # the state dict alone holds the shard; fused tensors it saves in pieces are freed
            report.seconds["build"] = time.perf_counter() - t0
            growth = plan_growth(source, dst_spec, cfg, depth, allow_non_finite)  # once a run
            ranks = dict(tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                         ep_rank=parallel_state.get_expert_model_parallel_rank())
            # every rank learns of a refusal here (bad values in its part of the source) before the save's collectives
            agree(functools.partial(fill_rank, growth, slots, report, on_slice=on_slice, **ranks))
            del slots
            extra, place = (grown_run(growth, model, model_sd, adam_step, lambda g, s: fill_rank(g, s, report, **ranks),
                                      req.restart_schedule) if grow_optimizer else ({}, {}))
            claim.clear()  # an earlier output goes only now that the source has been read whole

            trim_heap()  # dist_checkpointing forks writers: hand them a compact heap
            _fault_while_writing()
            t0 = time.perf_counter()
            if req.legacy:  # local-spec module names: --transformer-impl local
                model_sd = model.state_dict()
            iteration = place.get("iteration", 0)  # a new model, or the source's run continued
            save_megatron(dst_root, iteration, model_sd, destination_args(req, source, dst_spec, dtype, place),
                          {"megaclone": clone_record(req, source, dst_spec, growth.rules), **extra},
                          legacy=(parallel_state.get_tensor_model_parallel_rank(),
                                  parallel_state.get_data_parallel_rank() == 0) if req.legacy else None)
            del model_sd
        report.seconds["write"] = time.perf_counter() - t0
        report.seconds["total"] = time.perf_counter() - start
        report.seconds["cpu"] = cpu_seconds() - cpu_start
        return gather_reports(report, memory)
    finally:
        memory.stop()  # a refusal or a failure must not leave the sampler running in the caller


def validate_request(req: Request, src_root: Path) -> tuple[Source, ModelSpec, Optional[float]]:
    """The source, opened and checked, the destination's spec and (--grow-optimizer) the source's Adam
    step count: every refusal the request and the source decide, before anything is written."""
    world = dist.get_world_size()
    if world % (req.tp * req.ep):
        ranks = f"--tp {req.tp} x --ep {req.ep}" if req.ep > 1 else f"--tp {req.tp}"
        raise MegacloneError(f"world size {world} is not a multiple of {ranks}",
                             f"launch with --nproc_per_node {req.tp * req.ep} (or a multiple of it)")
    source = open_source(src_root, req.load_format, req.vocab_size)
    source.spec.require_megatron(str(source.path))
    dst_spec = destination_spec(source, req.factors, req.tp, req.depth, req.experts, req.expert_parallel)
    if req.legacy and req.experts:
        raise MegacloneError("--save-format torch does not write mixture-of-experts checkpoints",
                             "use the default torch_dist format (it loads into sequential and grouped-GEMM experts)")
    if req.legacy and req.pp != 1:
        raise MegacloneError("--save-format torch writes pipeline size 1 only",
                             "use the default torch_dist format (one destination serves every --pp)")
    if req.pp < 1 or dst_spec.num_layers % req.pp:
        depth = req.depth
        grown = f" ({source.spec.num_layers} x depth factor {depth.factor})" if depth.factor > 1 else ""
        raise MegacloneError(f"--pp {req.pp} does not divide the {dst_spec.num_layers} layers{grown}",
                             "choose a pipeline size that divides the number of layers"
                             + (", or a depth factor that makes it divisible" if depth.factor > 1 else ""))
    step = check_growable(source, req.depth, req.experts, req.legacy) if req.grow_optimizer else None
    return source, dst_spec, step


def grown_run(growth: Growth, model, model_sd: dict, adam_step: float, fill: Callable[[Growth, Slots], None],
              restart: bool = False) -> tuple[dict, dict]:
    """--grow-optimizer: the destination's optimizer state grown from the source's (each state by its
    own rules through ``fill``, this rank's fill_rank), and where the source's run stands (its iteration,
    samples, scheduler and flops), so the destination continues it; with ``restart`` the destination
    starts at iteration 0 with no schedule state (the moments and Adam's step count kept). Returns (the
    checkpoint's extra state, the run's place for the args)."""
    run = continuation(growth.source)
    if restart:
        run = {"iteration": 0, "consumed_train_samples": 0,
               **({"grad_scaler": run["grad_scaler"]} if "grad_scaler" in run else {})}

    def fill_state(slots: Slots, rules: list[ParamRule], moments: bool = False) -> None:
        fill(for_state(growth, rules) if moments else dataclasses.replace(growth, rules=rules), slots)

    optimizer = agree(lambda: grown_adam_state(model, model_sd, adam_step, growth.rules, fill_state,
                                               mixed_precision(growth.source), run.get("grad_scaler")))
    extra = {"optimizer": optimizer, **{k: run[k] for k in ("opt_param_scheduler", "num_floating_point_operations_so_far")
                                       if k in run}}
    return extra, {k: run[k] for k in ("iteration", "consumed_train_samples")}


def destination_args(req: Request, source: Source, dst_spec: ModelSpec, dtype: torch.dtype, place: dict):
    """Megatron-LM's args of the destination: the source's with the grown shape, the pipeline size the
    request declares and the run's place (a new model starts at iteration 0)."""
    args = dst_spec.to_args(source.args, dtype=dtype)
    args.pipeline_model_parallel_size = req.pp
    args.iteration = place.get("iteration", 0)
    args.consumed_train_samples = place.get("consumed_train_samples", 0)
    return args


def clone_record(req: Request, source: Source, dst_spec: ModelSpec, rules: list[ParamRule]) -> dict:
    """What megaclone records with a clone: how it was grown (the weight check reads it back), from what,
    and each tensor's value and gradient scales (the trainer's --clone-*-scaling)."""
    record = {
        "factors": dataclasses.asdict(req.factors),
        "depth": dataclasses.asdict(req.depth),
        "experts": None if dst_spec.experts is None else dataclasses.asdict(dst_spec.experts),
        "variant": req.cfg.variant.value,
        "snr_db": req.cfg.snr_db,
        "seed": req.cfg.seed,
        "source": str(source.path.resolve()),
        "source_format": source.format.value,
        "grown_optimizer": req.grow_optimizer,
        "restart_schedule": req.restart_schedule,
    }
    if req.experts is None:  # not for new experts: a router row shared by copies scales no tensor alike
        record["adam_scaling"] = adam_scaling(rules)
    return record


def gather_reports(report: RankReport, memory: PeakMemory) -> list[RankReport]:
    """Every rank's report on every rank, this rank's peak memory (sampling ends here) in its own."""
    report.peak_rss = memory.stop()
    return gathered(report)


