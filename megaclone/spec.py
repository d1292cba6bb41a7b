"""Model shape read from Megatron-LM checkpoint args, and the grown shape for given clone factors.

Pure data: no files, no processes. ``ModelSpec.from_args`` follows Megatron-LM's conventions
(``num_query_groups`` counts only with ``group_query_attention``; ``kv_channels`` None means
hidden/heads; ``padded_vocab_size`` was padded for the source TP).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from .errors import MegacloneError

if TYPE_CHECKING:
    from .index_maps import DimMap

NORMALIZATIONS = ("LayerNorm", "RMSNorm")
POSITION_EMBEDDINGS = ("learned_absolute", "rope", "none")


@dataclass(frozen=True)
class ModelSpec:
    """Everything about a GPT model's shape that cloning and Megatron need (one TP layout)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    ffn_hidden_size: int
    vocab_size: int  # true vocabulary (real token ids)
    padded_vocab_size: int  # rows of the embedding and output layer at this TP
    make_vocab_size_divisible_by: int
    tensor_parallel: int
    max_position_embeddings: int
    position_embedding_type: str = "rope"
    swiglu: bool = True
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    untie_embeddings_and_output_weights: bool = True
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    openai_gelu: bool = False  # GPT-2's tanh-approximated GeLU (Megatron-LM --openai-gelu)
    qk_layernorm: bool = False  # a norm over each query and key head (Qwen3; Megatron-LM --qk-layernorm)
    relu: bool = False  # plain ReLU MLP (OPT): megaclone's own field, Megatron-LM has no such flag

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def qkv_rows_per_group(self) -> int:
        """Rows of one query group in fused QKV: its query heads, one key and one value head."""
        return (self.heads_per_group + 2) * self.kv_channels

    @property
    def tied(self) -> bool:
        return not self.untie_embeddings_and_output_weights

    @property
    def has_qkv_bias(self) -> bool:
        return self.add_bias_linear or self.add_qkv_bias

    @classmethod
    def from_args(cls, args: Any, vocab_size: Optional[int] = None) -> "ModelSpec":
        """Read a Megatron-LM args Namespace; refuse features megaclone does not clone."""
        get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
        _refuse_unsupported(args)
        hidden = get("hidden_size")
        heads = get("num_attention_heads")
        groups = get("num_query_groups") if get("group_query_attention", False) else heads
        kv = get("kv_channels") or hidden // heads
        padded = get("padded_vocab_size")
        if hidden is None or heads is None or get("num_layers") is None or padded is None:
            raise MegacloneError(
                "checkpoint args lack num_layers, hidden_size, num_attention_heads or padded_vocab_size",
                "point --load at a checkpoint written by Megatron-LM training (common.pt holds its args)",
            )
        pos = get("position_embedding_type", "learned_absolute")
        if get("use_rotary_position_embeddings", False):
            pos = "rope"
        if vocab_size is not None and not 0 < vocab_size <= padded:
            raise MegacloneError(f"--vocab-size {vocab_size} is not within the checkpoint's {padded} embedding rows",
                                 f"pass the true vocabulary size, from 1 to {padded} (or leave it out)")
        true_vocab = vocab_size or (get("vocab_size") and get("vocab_size") + _extra_ids(args)) or padded
        return cls(
            num_layers=get("num_layers"),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=groups or 1,
            kv_channels=kv,
            ffn_hidden_size=get("ffn_hidden_size") or 4 * hidden,
            vocab_size=min(true_vocab, padded),
            padded_vocab_size=padded,
            make_vocab_size_divisible_by=get("make_vocab_size_divisible_by", 128) or 1,
            tensor_parallel=get("tensor_model_parallel_size", 1),
            max_position_embeddings=get("max_position_embeddings") or get("seq_length"),
            position_embedding_type=pos,
            swiglu=bool(get("swiglu", False)),
            normalization=get("normalization", "LayerNorm"),
            norm_epsilon=get("norm_epsilon", 1e-5),
            add_bias_linear=bool(get("add_bias_linear", True)),
            add_qkv_bias=bool(get("add_qkv_bias", False)),
            untie_embeddings_and_output_weights=bool(get("untie_embeddings_and_output_weights", False)),
            rotary_base=get("rotary_base", 10000),
            rotary_percent=get("rotary_percent", 1.0),
            openai_gelu=bool(get("openai_gelu", False)),
            qk_layernorm=bool(get("qk_layernorm", False)),
            relu=bool(get("relu", False)),
        )

    def to_args(self, base: Any = None, dtype: Any = None) -> argparse.Namespace:
        """Megatron-LM args for this spec: ``base`` (e.g. the source's args) with the shape fields set
        (and Megatron-LM's bf16/fp16 flags for ``dtype``, a torch.dtype, when given).

        Only plain Python values are written, so ``common.pt`` loads without unpickling foreign types.
        """
        out = argparse.Namespace(**{k: v for k, v in vars(base or argparse.Namespace()).items() if _plain(v)})
        fields = {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "ffn_hidden_size": self.ffn_hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_query_groups": self.num_query_groups,
            "group_query_attention": self.num_query_groups != self.num_attention_heads,
            "kv_channels": self.kv_channels,
            "max_position_embeddings": self.max_position_embeddings,
            "position_embedding_type": self.position_embedding_type,
            "swiglu": self.swiglu,
            "normalization": self.normalization,
            "norm_epsilon": self.norm_epsilon,
            "add_bias_linear": self.add_bias_linear,
            "add_qkv_bias": self.add_qkv_bias,
            "untie_embeddings_and_output_weights": self.untie_embeddings_and_output_weights,
            "padded_vocab_size": self.padded_vocab_size,
            "vocab_size": self.vocab_size - _extra_ids(out),
            "make_vocab_size_divisible_by": self.make_vocab_size_divisible_by,
            "tensor_model_parallel_size": self.tensor_parallel,
            "pipeline_model_parallel_size": 1,
            "rotary_base": self.rotary_base,
            "rotary_percent": self.rotary_percent,
            "openai_gelu": self.openai_gelu,
            "qk_layernorm": self.qk_layernorm,
            "relu": self.relu,
            # what Megatron-LM's --use-checkpoint-args forces and megaclone's models imply
            "add_position_embedding": self.position_embedding_type == "learned_absolute",
            "use_rotary_position_embeddings": self.position_embedding_type == "rope",
            "rotary_interleaved": False,
            "squared_relu": False,
            "apply_layernorm_1p": False,
            "apply_query_key_layer_scaling": False,
        }
        for key, value in fields.items():
            setattr(out, key, value)
        if dtype is not None:
            out.bf16, out.fp16 = str(dtype) == "torch.bfloat16", str(dtype) == "torch.float16"
            out.params_dtype = str(dtype).replace("torch.", "")
        if not hasattr(out, "seq_length"):
            out.seq_length = self.max_position_embeddings
        return out


def feasible_tp(spec: ModelSpec, world: int) -> int:
    """The largest TP that divides ``world`` and every axis TP splits (heads, groups, FFN, vocab)."""
    sizes = (spec.num_attention_heads, spec.num_query_groups, spec.ffn_hidden_size, spec.padded_vocab_size)
    return max(d for d in range(1, world + 1) if world % d == 0 and all(s % d == 0 for s in sizes))


def _extra_ids(args: Any) -> int:
    """Ids a tokenizer adds past ``args.vocab_size``: Megatron-LM's NullTokenizer appends its eod id."""
    return 1 if getattr(args, "tokenizer_type", None) == "NullTokenizer" else 0


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _refuse_unsupported(args: Any) -> None:
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    unsupported = {
        "num_experts": "mixture-of-experts layers",
        "apply_layernorm_1p": "zero-centered (1p) layernorm",
        "multi_latent_attention": "multi-latent attention",
        "apply_residual_connection_post_layernorm": "post-layernorm residuals",
    }
    for name, what in unsupported.items():
        if get(name):
            raise MegacloneError(
                f"the source model uses {what} ({name}={get(name)!r}), which megaclone does not clone",
                "expand a dense GPT model (GQA/MHA attention, GeLU or SwiGLU MLP, LayerNorm or RMSNorm)",
            )
    if get("normalization", "LayerNorm") not in NORMALIZATIONS:
        raise MegacloneError(f"normalization {get('normalization')!r} is not supported", f"use one of {NORMALIZATIONS}")
    if get("position_embedding_type", "learned_absolute") not in POSITION_EMBEDDINGS:
        raise MegacloneError(
            f"position_embedding_type {get('position_embedding_type')!r} is not supported",
            f"use one of {POSITION_EMBEDDINGS}",
        )


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
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
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

    def layer_map(self, src_layers: int) -> "DimMap":
        """Destination layer -> (source layer, copy); copy 0 is the source layer's own place."""
        from .index_maps import Repeat, Tile  # numpy: kept out of the flag parsers' imports (--help)

        return Repeat(src_layers, self.factor) if self.placement == "interleave" else Tile(src_layers, self.factor)


def pad_vocab(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron's padding: round the true vocab up to a multiple of divisible_by x TP."""
    multiple = divisible_by * tensor_parallel
    return int(math.ceil(vocab_size / multiple) * multiple)


def grow(src: ModelSpec, factors: Factors, tensor_parallel: int, depth: Depth = Depth()) -> ModelSpec:
    """The destination spec: widths and layers multiplied, head dim unchanged, vocab re-padded for the
    new TP."""
    factors.validate()
    return dataclasses.replace(
        src,
        num_layers=src.num_layers * depth.factor,
        hidden_size=src.hidden_size * factors.hidden,
        num_attention_heads=src.num_attention_heads * factors.heads,
        num_query_groups=src.num_query_groups * factors.groups,
        ffn_hidden_size=src.ffn_hidden_size * factors.ffn,
        padded_vocab_size=pad_vocab(src.vocab_size, src.make_vocab_size_divisible_by, tensor_parallel),
        tensor_parallel=tensor_parallel,
    )


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
