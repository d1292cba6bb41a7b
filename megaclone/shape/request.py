"""What a user asks to grow: ``Factors`` (widths), ``Depth`` (layers), and ``grow``, which turns a
source spec and a request into the destination's spec. Pure arithmetic: no tensors, no files.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from megaclone.errors import MegacloneError
from megaclone.shape.spec import Experts, ModelSpec, is_integer, pad_vocab


@dataclass(frozen=True)
class Factors:
    """Integer growth factors: n for hidden, k for heads, m for the FFN, and g for query groups (a
    divisor of k; None: k, the groups grow with the heads)."""

    hidden: int
    heads: int
    ffn: int
    query_groups: Optional[int] = None

    @classmethod
    def uniform(cls, factor: int) -> "Factors":
        return cls(factor, factor, factor)

    @property
    def groups(self) -> int:
        return self.heads if self.query_groups is None else self.query_groups

    def validate(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if value is None and name == "query_groups":
                continue
            if not (is_integer(value) and value >= 1):
                raise MegacloneError(
                    f"the {name} factor must be a positive integer, got {value!r}",
                    "pass --factor N (or --hidden-factor/--head-factor/--query-group-factor/--ffn-factor) "
                    "with N >= 1",
                )
        if self.heads % self.groups:
            raise MegacloneError(
                f"the query-group factor {self.groups} does not divide the head factor {self.heads}: the new "
                "heads must split evenly over the query groups",
                f"pass --query-group-factor 1 (keep the groups) or a divisor of {self.heads}")


DEPTH_INITS = ("identity", "stack")


DEPTH_PLACEMENTS = ("interleave", "top")


@dataclass(frozen=True)
class Depth:
    """Depth growth: the destination stacks ``factor`` layers per source layer.

    ``placement`` orders them: "interleave" puts each source layer's copies right after it
    (destination layer i copies source layer i div factor), "top" repeats the whole source stack
    (i copies i mod L). ``init`` sets the copies (every copy but the first of each source layer):
    "identity" zeroes the weights and biases through which a layer writes to the residual stream (the
    attention output projection and the second MLP projection), so an added layer adds nothing and the
    model computes the source's function (LLaMA-Pro's block expansion); "stack" copies the layer
    whole (G_stack), which changes the function.
    """

    factor: int = 1
    init: str = "identity"
    placement: str = "interleave"

    def __post_init__(self):
        if not isinstance(self.factor, int) or isinstance(self.factor, bool) or self.factor < 1:
            raise MegacloneError(f"the depth factor must be a positive integer, got {self.factor!r}",
                                 "pass --depth-factor N with N >= 1 (1 keeps the source's layers)")
        if self.init not in DEPTH_INITS:
            raise MegacloneError(f"unknown depth init {self.init!r}", f"pass --depth-init one of {DEPTH_INITS}")
        if self.placement not in DEPTH_PLACEMENTS:
            raise MegacloneError(f"unknown depth placement {self.placement!r}",
                                 f"pass --depth-placement one of {DEPTH_PLACEMENTS}")

    @property
    def function_preserving(self) -> bool:
        return self.factor == 1 or self.init == "identity"

    @property
    def zeroes_added_outputs(self) -> bool:
        return self.factor > 1 and self.init == "identity"



def grown_spec(src: ModelSpec, factors: Factors, tensor_parallel: int, depth: Depth = Depth(),
               experts: Optional[Experts] = None, expert_parallel: int = 1) -> ModelSpec:
    """The destination spec: widths and layers multiplied, head dim unchanged, vocab re-padded for the
    new TP; with ``experts``, every (grown) MLP upcycled to them. An MoE source keeps its experts (their
    FFN grown by the FFN factor) over ``expert_parallel`` EP ranks."""
    factors.validate()
    if src.experts is not None:
        shared = src.experts.shared_ffn_hidden_size
        grown = dataclasses.replace(src.experts, ffn_hidden_size=src.experts.ffn_hidden_size * factors.ffn,
                                    parallel=expert_parallel, shared_ffn_hidden_size=shared and shared * factors.ffn)
        experts = grown if experts is None else more_experts(grown, experts)
    elif expert_parallel != 1:
        raise MegacloneError(f"--ep {expert_parallel} splits experts, but the source is dense and no --num-experts "
                             "was given", "pass --num-experts E to upcycle, or leave out --ep")
    ffn = src.ffn_hidden_size * factors.ffn
    if experts is not None and src.experts is None:
        experts.check_upcycling(ffn)
        experts = dataclasses.replace(experts, ffn_hidden_size=experts.ffn_hidden_size or ffn)
        if src.add_bias_linear:
            raise MegacloneError("upcycling a model with linear biases is not supported (megaclone gives each "
                                 "expert no bias)", "upcycle a model without biases (add_bias_linear False), "
                                 "or leave out --num-experts")
    return dataclasses.replace(
        src,
        num_layers=src.num_layers * depth.factor,
        hidden_size=src.hidden_size * factors.hidden,
        num_attention_heads=src.num_attention_heads * factors.heads,
        num_query_groups=src.num_query_groups * factors.groups,
        ffn_hidden_size=ffn,
        padded_vocab_size=pad_vocab(src.vocab_size, src.make_vocab_size_divisible_by, tensor_parallel),
        tensor_parallel=tensor_parallel,
        experts=experts,
    )


def more_experts(grown: Experts, request: Experts) -> Experts:
    """The destination's experts when an MoE source (its experts ``grown`` in width) gets ``request.num``
    = G x E experts: each source expert becomes G experts holding its FFN cut into g slices (G / g copies
    of each), top-k x G, the router's row of expert e copied to its G experts; the second projection
    carries g. The chosen experts then weigh each slice copy p_e / G (docs/design.md, "More experts from
    a mixture"). Refused, with the reason, where that is not exact."""
    e, k, f = grown.num, grown.topk, grown.ffn_hidden_size
    if request.num % e:
        raise MegacloneError(f"--num-experts {request.num} is not a multiple of the source's {e} experts",
                             f"pass a multiple of {e} (each source expert becomes that many experts)")
    g_copies = request.num // e
    size = request.ffn_hidden_size or (f // g_copies if f % g_copies == 0 else f)  # default: the finest cut
    slices = f // size if f % size == 0 else 0
    if not slices or g_copies % slices:
        raise MegacloneError(f"an expert FFN of {size} does not cut the grown experts' FFN of {f} into slices that "
                             f"{g_copies} experts per source expert can hold whole",
                             "pass a --moe-ffn-hidden-size that divides it into a divisor of "
                             f"{g_copies} slices, or leave the flag out")
    if request.topk != k * g_copies:
        raise MegacloneError(f"top-{request.topk} does not pick whole groups of the {g_copies} experts each of the "
                             f"source's top-{k} experts becomes", f"pass --moe-router-topk {k * g_copies}")
    if grown.score_function != "softmax" or grown.load_balancing_type == "sinkhorn":
        raise MegacloneError(f"the source routes with {grown.score_function} scores"
                             + (" and sinkhorn balancing" if grown.load_balancing_type == "sinkhorn" else "")
                             + ", under which experts cut into slices do not add up to the whole expert",
                             "grow this mixture without --num-experts (width and depth keep any router)")
    return dataclasses.replace(grown, num=request.num, topk=request.topk, ffn_hidden_size=size,
                               parallel=request.parallel, grouped_gemm=request.grouped_gemm or grown.grouped_gemm)


def check_divisible(spec: ModelSpec) -> None:
    """Refuse a spec whose partitioned widths do not divide by its TP (Megatron would assert later)."""
    tp = spec.tensor_parallel
    if tp < 1:
        raise MegacloneError(f"tensor-parallel size must be >= 1, got {tp}", "pass --tp N with N >= 1")
    checks = {
        "attention heads": spec.num_attention_heads,
        "query groups": spec.num_query_groups,
        "FFN hidden size": spec.ffn_hidden_size,
        "padded vocabulary": spec.padded_vocab_size,
    }
    if spec.experts:
        checks["expert FFN hidden size"] = spec.experts.ffn_hidden_size
        if spec.experts.shared_ffn_hidden_size:
            checks["shared expert FFN hidden size"] = spec.experts.shared_ffn_hidden_size
    for what, size in checks.items():
        if size % tp:
            raise MegacloneError(
                f"the destination has {size} {what}, which does not divide by --tp {tp}",
                "choose a --tp that divides it, or factors that make it divisible",
            )
    if spec.num_attention_heads % spec.num_query_groups:
        raise MegacloneError(
            f"{spec.num_attention_heads} heads do not split into {spec.num_query_groups} query groups",
            "check num_attention_heads and num_query_groups in the source args",
        )


def not_function_preserving(clone_record: Optional[dict]) -> Optional[str]:
    """Why a clone (by the record megaclone wrote with it) does not compute its source's function by
    design; None when it does, or when the checkpoint is not a clone."""
    depth = Depth(**(clone_record or {}).get("depth", {}))
    if depth.function_preserving:
        return None
    return (f"this clone was grown in depth with --depth-init {depth.init} (x{depth.factor}): its added layers are "
            "exact copies that change the function, so its logits are not the source's by design")
