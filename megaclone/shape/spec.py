"""Model shape read from Megatron-LM checkpoint args, and the grown shape for given clone factors.

Pure data: no files, no processes. ``ModelSpec.from_args`` follows Megatron-LM's conventions
(``num_query_groups`` counts only with ``group_query_attention``; ``kv_channels`` None means
hidden/heads; ``padded_vocab_size`` was padded for the source TP).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Optional

from megaclone.errors import MegacloneError

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
    experts: Optional["Experts"] = None  # mixture-of-experts MLPs; None: dense
    # Features of Hugging Face families that megatron-core's GPTModel does not compute: such a model grows
    # Hugging Face to Hugging Face only (``megatron_cannot`` says why). Read from ``hf_*`` args fields.
    parallel_residual: bool = False  # attention and MLP both read the layer's input (GPT-NeoX/Pythia)
    scaled_embedding: bool = False  # input embeddings multiplied by sqrt(hidden_size) (Gemma)
    zero_centered_norms: bool = False  # a norm's weight w scales by (1 + w) (Gemma)
    pre_norms: bool = True  # a norm before attention and before the MLP (every family but OLMo-2)
    post_norms: bool = False  # a norm on the attention and MLP outputs before the residual add (Gemma 2, OLMo-2)
    qk_norm_over_projection: bool = False  # q and k normalized over the whole projection, not per head (OLMo-2)

    def __post_init__(self):
        check_shape_fields(self)

    @property
    def hf_only_features(self) -> frozenset[str]:
        """The features of this model that megatron-core's GPTModel does not compute (``HF_ONLY``)."""
        return frozenset(name for name, (on, _) in _hf_only(self).items() if on)

    @property
    def megatron_cannot(self) -> Optional[str]:
        """Why megatron-core's GPTModel cannot compute this model (None when it can)."""
        return ", ".join(what for on, what in _hf_only(self).values() if on) or None

    def require_megatron(self, what: str) -> None:
        """Refuse a model megatron-core's GPTModel would compute differently (before anything is written)."""
        if self.megatron_cannot:
            raise MegacloneError(f"{what} has {self.megatron_cannot}, which megatron-core's GPTModel does not compute",
                                 "grow it Hugging Face to Hugging Face instead: --load-hf SRC --save-hf DST")

    @property
    def expert_parallel(self) -> int:
        return self.experts.parallel if self.experts else 1

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
            swiglu=_flag(args, "swiglu", False),
            normalization=get("normalization", "LayerNorm"),
            norm_epsilon=get("norm_epsilon", 1e-5),
            add_bias_linear=_flag(args, "add_bias_linear", True),
            add_qkv_bias=_flag(args, "add_qkv_bias", False),
            untie_embeddings_and_output_weights=_flag(args, "untie_embeddings_and_output_weights", False),
            rotary_base=get("rotary_base", 10000),
            rotary_percent=get("rotary_percent", 1.0),
            openai_gelu=_flag(args, "openai_gelu", False),
            qk_layernorm=_flag(args, "qk_layernorm", False),
            relu=_flag(args, "relu", False),
            experts=Experts.from_args(args),
            parallel_residual=_flag(args, "hf_parallel_residual", False),
            scaled_embedding=_flag(args, "hf_scaled_embedding", False),
            zero_centered_norms=_flag(args, "hf_zero_centered_norms", False),
            pre_norms=_flag(args, "hf_pre_norms", True),
            post_norms=_flag(args, "hf_post_norms", False),
            qk_norm_over_projection=_flag(args, "hf_qk_norm_over_projection", False),
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
        fields.update(self.experts.to_args(self.tensor_parallel) if self.experts else {"num_experts": None})
        for key, value in fields.items():
            setattr(out, key, value)
        if dtype is not None:
            out.bf16, out.fp16 = str(dtype) == "torch.bfloat16", str(dtype) == "torch.float16"
            out.params_dtype = str(dtype).replace("torch.", "")
        if not hasattr(out, "seq_length"):
            out.seq_length = self.max_position_embeddings
        return out


def _hf_only(spec: ModelSpec) -> dict[str, tuple[bool, str]]:
    return {
        "parallel_residual": (spec.parallel_residual, "a parallel residual (attention and MLP read the same input)"),
        "scaled_embedding": (spec.scaled_embedding, "input embeddings scaled by sqrt(hidden_size)"),
        "zero_centered_norms": (spec.zero_centered_norms, "norms that scale by (1 + weight)"),
        "no_pre_norms": (not spec.pre_norms, "no norm before attention and the MLP"),
        "post_norms": (spec.post_norms, "norms on the attention and MLP outputs"),
        "qk_norm_over_projection": (spec.qk_norm_over_projection, "q and k norms over the whole projection"),
    }


def feasible_tp(spec: ModelSpec, world: int) -> int:
    """The largest TP that divides ``world`` and every axis TP splits (heads, groups, FFN, vocab)."""
    sizes = (spec.num_attention_heads, spec.num_query_groups, spec.ffn_hidden_size, spec.padded_vocab_size,
             *((spec.experts.ffn_hidden_size,) if spec.experts else ()))
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


SIZE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "ffn_hidden_size",
               "vocab_size", "padded_vocab_size", "make_vocab_size_divisible_by", "tensor_parallel",
               "max_position_embeddings")
FLAG_FIELDS = ("swiglu", "add_bias_linear", "add_qkv_bias", "untie_embeddings_and_output_weights", "openai_gelu",
               "qk_layernorm", "relu", "parallel_residual", "scaled_embedding", "zero_centered_norms", "pre_norms",
               "post_norms", "qk_norm_over_projection")


def is_integer(value: Any) -> bool:
    """An int that is not a bool (Python's True is an int): the one test of a size or count field."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float that is not a bool: the one test of a numeric field (finiteness apart)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _refuse_field(name: str, value: Any, must: str) -> None:
    raise MegacloneError(f"the model's {name} is {value!r}, but it must be {must}",
                         "correct it where the checkpoint's args or config.json were written (the model's own "
                         "value from training)")


def check_shape_fields(spec: "ModelSpec") -> None:
    """Every field of a model's shape has its type and range, whether it came from Megatron args or a
    config.json: sizes positive integers (heads a multiple of query groups), the norm's epsilon and the
    RoPE base positive and finite, the rotary fraction in (0, 1], flags booleans."""
    for name in SIZE_FIELDS:
        value = getattr(spec, name)
        if not (is_integer(value) and value >= 1):
            _refuse_field(name, value, "a positive integer")
    for name in FLAG_FIELDS:
        if not isinstance(getattr(spec, name), bool):
            _refuse_field(name, getattr(spec, name), "true or false")
    for name, low, high in (("norm_epsilon", 0.0, math.inf), ("rotary_base", 0.0, math.inf),
                            ("rotary_percent", 0.0, 1.0)):
        value = getattr(spec, name)
        if not (is_number(value) and math.isfinite(value) and low < value <= high):
            _refuse_field(name, value, "a positive finite number" if high == math.inf else "a number in (0, 1]")
    if spec.num_attention_heads % spec.num_query_groups:
        _refuse_field("num_query_groups", spec.num_query_groups,
                      f"a divisor of the {spec.num_attention_heads} attention heads")


def _flag(args: Any, name: str, default: bool) -> bool:
    """A boolean field of Megatron args (absent or None: ``default``); anything else but a boolean is
    refused rather than read as Python's truth (the string "false" is true)."""
    value = getattr(args, name, None)
    if value is None:
        return default
    if not isinstance(value, bool):
        _refuse_field(name, value, "true or false")
    return value


def _refuse_unsupported(args: Any) -> None:
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    unsupported = {
        "moe_expert_capacity_factor": "an expert capacity (dropped tokens)",
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
    if get("num_experts") and get("moe_layer_freq", 1) not in (None, 1):
        raise MegacloneError(f"the model mixes dense and mixture-of-experts layers (moe_layer_freq="
                             f"{get('moe_layer_freq')!r}), which megaclone does not read",
                             "use a model whose every layer is a mixture of experts, or a dense model")
    if get("normalization", "LayerNorm") not in NORMALIZATIONS:
        raise MegacloneError(f"normalization {get('normalization')!r} is not supported", f"use one of {NORMALIZATIONS}")
    if get("position_embedding_type", "learned_absolute") not in POSITION_EMBEDDINGS:
        raise MegacloneError(
            f"position_embedding_type {get('position_embedding_type')!r} is not supported",
            f"use one of {POSITION_EMBEDDINGS}",
        )


ROUTER_INITS = ("random", "zero")
# Megatron-LM's --moe-router-load-balancing-type values that change only the loss, never the forward
# pass; "sinkhorn" re-routes tokens in training and is refused.
LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")


@dataclass(frozen=True)
class Experts:
    """Mixture-of-experts MLPs in megatron-core's MoE layer: ``num`` experts of ``ffn_hidden_size``
    (None until ``grow`` sets it: the dense FFN), the top ``topk`` per token, ``parallel`` expert-
    parallel ranks (each holds num/parallel experts; experts are split over TP like the dense MLP).

    Upcycling (docs/design.md, "Experts") makes every expert a slice of the dense MLP: granularity
    G = dense FFN / expert FFN, expert e holds slice e mod G with its second projection scaled by G,
    and the router gives the G experts of a virtual group (e div G) one row, so top-k picks whole
    groups. The layer then computes the dense MLP exactly when the top-k weights sum to one over
    whole groups: softmax after top-k (Megatron's default), or before it when top-k is every expert.
    The sigmoid score function, pre-softmax with fewer than all experts, and sinkhorn balancing
    change the function and are refused.
    """

    num: int
    topk: int
    ffn_hidden_size: Optional[int] = None
    parallel: int = 1
    grouped_gemm: bool = False
    router_init: str = "random"  # "random": seeded normal rows per virtual group; "zero": all logits tie
    pre_softmax: bool = False
    score_function: str = "softmax"
    load_balancing_type: str = "aux_loss"
    aux_loss_coeff: float = 0.0
    shared_ffn_hidden_size: Optional[int] = None  # a shared expert every token passes (None: none)
    shared_gate: bool = False  # the shared expert's output scaled by sigmoid(gate . x) (Qwen2-MoE)

    def __post_init__(self):
        for name in ("num", "topk", "parallel"):
            value = getattr(self, name)
            if not (is_integer(value) and value >= 1):
                flag = {"num": "--num-experts", "topk": "--moe-router-topk", "parallel": "--ep"}[name]
                raise MegacloneError(f"{flag} must be a positive integer, got {value!r}", f"pass {flag} N with N >= 1")
        if self.num < 2:
            raise MegacloneError(f"--num-experts {self.num}: a mixture needs at least 2 experts",
                                 "pass --num-experts 2 or more (or leave it out for a dense model)")
        if self.topk > self.num:
            raise MegacloneError(f"--moe-router-topk {self.topk} is larger than --num-experts {self.num}",
                                 f"route each token to at most {self.num} experts")
        if self.num % self.parallel:
            raise MegacloneError(f"--num-experts {self.num} does not divide over --ep {self.parallel} ranks",
                                 "choose an expert-parallel size that divides the number of experts")
        if self.router_init not in ROUTER_INITS:
            raise MegacloneError(f"unknown router init {self.router_init!r}", f"pass --moe-router-init one of {ROUTER_INITS}")
        if self.ffn_hidden_size is not None and self.ffn_hidden_size < 1:
            raise MegacloneError(f"--moe-ffn-hidden-size must be positive, got {self.ffn_hidden_size}",
                                 "pass a divisor of the (grown) FFN hidden size")

    def check_routing(self) -> None:
        """Refuse router settings under which experts cut from one MLP (upcycling, or an expert split into
        slices) would not add up to it: the chosen slices' weights must sum to the whole's. A source's
        own router is never refused for this: width growth keeps any router's logits."""
        if self.topk == 1:
            raise MegacloneError("top-1 routing does not preserve the function: megatron-core requires "
                                 "--moe-router-pre-softmax with top-1, and the chosen expert is then weighted by its "
                                 "softmax over all experts, less than one", "pass --moe-router-topk 2 or more")
        if self.score_function != "softmax":
            raise MegacloneError(f"router score function {self.score_function!r} does not preserve the dense "
                                 "model's function: sigmoid scores of the chosen experts do not sum to one",
                                 "use --moe-router-score-function softmax")
        if self.pre_softmax and self.topk != self.num:
            raise MegacloneError(f"--moe-router-pre-softmax with top-{self.topk} of {self.num} experts does not "
                                 "preserve the function: the chosen experts' softmax weights sum to less than one",
                                 "leave out --moe-router-pre-softmax (softmax over the top-k, Megatron's default)")
        if self.load_balancing_type not in LOAD_BALANCING_TYPES:
            raise MegacloneError(f"load balancing {self.load_balancing_type!r} is not supported: sinkhorn changes "
                                 "which experts a token reaches in training, so training would not start from "
                                 "the dense model's function", f"use one of {LOAD_BALANCING_TYPES}")

    def granularity(self, dense_ffn: int) -> int:
        """G: experts per copy of the dense MLP (each holds 1/G of its FFN)."""
        return dense_ffn // (self.ffn_hidden_size or dense_ffn)

    def check_upcycling(self, dense_ffn: int) -> None:
        """Refuse expert shapes the dense MLP cannot be split into exactly (with the reason)."""
        self.check_routing()
        f = self.ffn_hidden_size or dense_ffn
        if dense_ffn % f:
            raise MegacloneError(f"--moe-ffn-hidden-size {f} does not divide the FFN hidden size {dense_ffn} "
                                 "(after width growth)", "pass a divisor of it, or leave the flag out")
        g = dense_ffn // f
        if self.num % g:
            raise MegacloneError(f"{self.num} experts are not whole copies of the dense MLP cut into {g} slices",
                                 f"pass a multiple of {g} to --num-experts")
        if self.topk % g and self.topk != self.num:
            raise MegacloneError(f"top-{self.topk} cannot pick whole groups of the {g} slices that make up the "
                                 "dense MLP, so the layer would not compute it",
                                 f"pass a multiple of {g} to --moe-router-topk")
        if self.router_init == "zero" and g > 1 and self.topk != self.num:
            raise MegacloneError("a zero router ties every expert, so top-k would not pick whole groups of slices",
                                 "use --moe-router-init random with granular experts")

    def to_args(self, tensor_parallel: int) -> dict[str, Any]:
        """The Megatron-LM arguments of this MoE layer (--use-checkpoint-args and the MoE flags)."""
        return {
            "num_experts": self.num,
            "moe_router_topk": self.topk,
            "moe_ffn_hidden_size": self.ffn_hidden_size,
            "expert_model_parallel_size": self.parallel,
            "expert_tensor_parallel_size": tensor_parallel,
            "moe_grouped_gemm": self.grouped_gemm,
            "moe_router_pre_softmax": self.pre_softmax,
            "moe_router_score_function": self.score_function,
            "moe_router_load_balancing_type": self.load_balancing_type,
            "moe_aux_loss_coeff": self.aux_loss_coeff,
            "moe_token_dispatcher_type": "allgather",
            "moe_router_topk_scaling_factor": None,
            "moe_expert_capacity_factor": None,
            "moe_shared_expert_intermediate_size": self.shared_ffn_hidden_size,
            "moe_shared_expert_gate": self.shared_gate,
            "moe_layer_freq": 1,
            "moe_router_init": self.router_init,  # megaclone's own record (how the router was set)
        }

    @classmethod
    def from_args(cls, args: Any) -> Optional["Experts"]:
        get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
        if not get("num_experts"):
            return None
        return cls(
            num=get("num_experts"), topk=get("moe_router_topk", 2),
            ffn_hidden_size=get("moe_ffn_hidden_size") or get("ffn_hidden_size") or 4 * get("hidden_size"),
            parallel=get("expert_model_parallel_size", 1) or 1, grouped_gemm=_flag(args, "moe_grouped_gemm", False),
            router_init=get("moe_router_init", "random"), pre_softmax=_flag(args, "moe_router_pre_softmax", False),
            score_function=get("moe_router_score_function", "softmax"),
            load_balancing_type=get("moe_router_load_balancing_type", "aux_loss"),
            aux_loss_coeff=get("moe_aux_loss_coeff", 0.0) or 0.0,
            shared_ffn_hidden_size=get("moe_shared_expert_intermediate_size"),
            shared_gate=_flag(args, "moe_shared_expert_gate", False))


def pad_vocab(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron's padding: round the true vocab up to a multiple of divisible_by x TP."""
    multiple = divisible_by * tensor_parallel
    return int(math.ceil(vocab_size / multiple) * multiple)


