"""megatron-core GPTModel for a ModelSpec at the current tensor-parallel layout, and its state I/O.

The destination's on-disk layout is whatever megatron-core's own ``GPTModel.sharded_state_dict``
says, so megaclone never writes a look-alike of Megatron's format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from megaclone.formats import torch_dist
from megaclone.formats.iterations import CHECKPOINT_VERSION
from megaclone.formats.legacy import save_legacy_checkpoint
from megaclone.shape.layout import EXPERTS, LAYERS
from megaclone.shape.spec import ModelSpec

# Transformer Engine norms (TE >= 1.13) request an _extra_state the local spec does not write; a
# destination carries it so Megatron-LM's default TE-spec model loads the checkpoint.
TE_ONLY_OBJECTS = ("decoder.final_layernorm._extra_state",)
MLP_NORM = LAYERS + "mlp.linear_fc1.layer_norm_"  # the pre-MLP norm's torch_dist key (local spec; fused in TE)
PRE_MLP_NORM = LAYERS + "pre_mlp_layernorm."  # its key in a Transformer Engine MoE layer

_LAYER = re.compile("^" + re.escape(LAYERS) + r"(\d+)\.")


def _pipeline_size() -> int:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_pipeline_model_parallel_world_size()


def transformer_config(spec: ModelSpec, dtype: torch.dtype, device: torch.device, initialize: bool,
                       init_method_std: float = 0.02, hidden_dropout: float = 0.0, attention_dropout: float = 0.0):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        **_moe_config(spec),
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.kv_channels,
        ffn_hidden_size=spec.ffn_hidden_size,
        normalization=spec.normalization,
        layernorm_epsilon=spec.norm_epsilon,
        add_bias_linear=spec.add_bias_linear,
        add_qkv_bias=spec.add_qkv_bias,
        gated_linear_unit=spec.swiglu,
        activation_func=_activation(spec),
        qk_layernorm=spec.qk_layernorm,
        tensor_model_parallel_size=spec.tensor_parallel,
        pipeline_model_parallel_size=_pipeline_size(),
        pipeline_dtype=dtype,
        hidden_dropout=hidden_dropout,
        attention_dropout=attention_dropout,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=device.type == "cpu",
        perform_initialization=initialize,
        init_method_std=init_method_std,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
    )


def _moe_config(spec: ModelSpec) -> dict[str, Any]:
    """megatron-core's MoE settings for ``spec.experts`` (none for a dense model). The experts run as
    megatron-core's SequentialMLP with the all-gather token dispatcher: the all-to-all one creates a
    CUDA stream when built, and grouped GEMM needs Transformer Engine or the grouped_gemm package.
    Both store the same torch_dist keys, so a checkpoint written this way loads into either."""
    experts = spec.experts
    if experts is None:
        return {}
    _define_te_general_gemm()
    return dict(
        num_moe_experts=experts.num,
        moe_router_topk=experts.topk,
        moe_ffn_hidden_size=experts.ffn_hidden_size,
        expert_model_parallel_size=experts.parallel,
        moe_token_dispatcher_type="allgather",
        moe_router_pre_softmax=experts.pre_softmax,
        moe_router_score_function=experts.score_function,
        moe_router_load_balancing_type=experts.load_balancing_type,
        moe_aux_loss_coeff=experts.aux_loss_coeff,
        moe_shared_expert_intermediate_size=experts.shared_ffn_hidden_size,
        moe_shared_expert_gate=experts.shared_gate,
        moe_grouped_gemm=False,
    )


def _define_te_general_gemm() -> None:
    """megatron-core 0.16.1's moe_utils binds ``te_general_gemm`` only when Transformer Engine imports,
    and its router's gating reads the name unconditionally (``if te_general_gemm is not None``), so
    without Transformer Engine every MoE forward raises NameError. Binding it to None selects the plain
    torch path that code already has."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _activation(spec: ModelSpec):
    if spec.swiglu:
        return torch.nn.functional.silu
    if spec.relu:
        return torch.nn.functional.relu
    if spec.openai_gelu:
        from megatron.core.transformer.utils import openai_gelu

        return openai_gelu
    return torch.nn.functional.gelu


def build_gpt(spec: ModelSpec, dtype: torch.dtype = torch.float32, device: torch.device | None = None,
              initialize: bool = False, init_method_std: float = 0.02, hidden_dropout: float = 0.0,
              attention_dropout: float = 0.0):
    """A GPTModel of ``spec`` sharded over the current megatron-core TP group (local layer spec); with
    pipeline parallelism, this rank's stage of it. Dropout acts in training mode only.

    With ``initialize=False`` the parameters are allocated but not written (the expander fills them).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec.require_megatron("this model")

    device = device or torch.device("cpu")
    model = GPTModel(
        config=transformer_config(spec, dtype, device, initialize, init_method_std, hidden_dropout, attention_dropout),
        transformer_layer_spec=get_gpt_layer_local_spec(
            num_experts=spec.experts.num if spec.experts else None, moe_grouped_gemm=False,
            normalization=spec.normalization, qk_layernorm=spec.qk_layernorm),
        vocab_size=spec.padded_vocab_size,
        max_sequence_length=spec.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=spec.tied,
        position_embedding_type=spec.position_embedding_type,
        rotary_percent=spec.rotary_percent,
        rotary_base=spec.rotary_base,
    )
    # megatron-core's local-spec norms ignore params_dtype; Megatron-LM's Transformer Engine norms do
    # not, so a bf16 checkpoint holds bf16 norms. Buffers (RoPE frequencies) stay as built.
    with torch.no_grad():
        for param in model.parameters():
            if param.dtype != dtype:
                param.data = param.data.to(dtype)
    return model.to(device)


def model_sharded_state_dict(model) -> dict[str, Any]:
    """``model.sharded_state_dict()`` plus the empty objects a Transformer Engine model requests."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing import ShardedObject

    sd = model.sharded_state_dict()
    replica = (0, parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_data_parallel_rank())
    for key in TE_ONLY_OBJECTS:
        sd.setdefault(key, ShardedObject(key, None, (1,), (0,), replica_id=replica))
    return sd


def add_te_moe_norm_keys(sd: dict[str, Any]) -> None:
    """Also store a MoE layer's pre-MLP norm under the key a Transformer Engine model loads it from.

    megatron-core's local spec maps ``pre_mlp_layernorm`` to ``mlp.linear_fc1.layer_norm_*`` (where a
    dense Transformer Engine layer fuses it), but a Transformer Engine MoE layer keeps it a module of
    its own (``gpt_layer_specs``: ``pre_mlp_layernorm=backend.layer_norm() if num_experts``, no key
    map), stored as ``pre_mlp_layernorm.*`` with an ``_extra_state``. Writing the values under both
    keys lets either spec load the checkpoint: dist_checkpointing's default strictness (and
    Megatron-LM's) accepts keys a model does not ask for. A no-op for a dense model (Transformer
    Engine fuses its norm). Every saver of a model calls it on the filled state dict just before
    saving, after anything that maps parameters to keys (the optimizer's state): the added entries
    share the norm's tensor.
    """
    import dataclasses as dc

    from megatron.core.dist_checkpointing import ShardedObject
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if not any(getattr(item, "key", "").startswith(EXPERTS) for item in sd.values()):
        return
    for name, item in list(sd.items()):
        if not (isinstance(item, ShardedTensor) and item.key.startswith(MLP_NORM)):
            continue
        te_key = PRE_MLP_NORM + item.key[len(MLP_NORM):]
        sd[name + ".te"] = dc.replace(item, key=te_key)
        layer, layers = item.global_offset[0], item.global_shape[0]
        extra = PRE_MLP_NORM + "_extra_state"
        sd.setdefault(f"{extra}.{layer}", ShardedObject(extra, None, (layers,), (layer,), replica_id=item.replica_id))


def save_megatron(root: Path, iteration: int, model_sd: dict[str, Any], args: Any,
                  extra: Optional[dict[str, Any]] = None,
                  legacy: Optional[tuple[int, bool]] = None) -> Path:
    """Save a Megatron checkpoint, ``<root>/iter_NNNNNNN`` in torch_dist, all ranks together: the
    model's sharded state dict (with the Transformer Engine MoE norm keys), ``args``, the iteration
    and the checkpoint version Megatron-LM checks, plus ``extra`` (optimizer, RNG, scheduler,
    provenance); published by the tracker file once every rank has finished. Every saver of a model
    goes through here, so no saver can drop a key the others write. ``extra`` is built before the
    call: the added norm keys share the norm's tensor, after anything that maps parameters to keys.

    With ``legacy=(tp_rank, writer)``, Megatron-LM's ``--ckpt-format torch`` instead: ``model_sd`` is
    then the model's plain state dict, written to that TP rank's file by the writer rank.
    """
    state = {"model": model_sd, "args": args, "iteration": iteration,
             "checkpoint_version": CHECKPOINT_VERSION, **(extra or {})}
    if legacy is not None:
        tp_rank, writer = legacy
        return save_legacy_checkpoint(Path(root), iteration, state, tp_rank, writer=writer)
    add_te_moe_norm_keys(model_sd)
    return torch_dist.save_checkpoint(Path(root), iteration, state)


@dataclass(frozen=True)
class RowBlock:
    """Rows [start, stop) of this rank's slice of one parameter (one layer of it), held in ``tensor``."""

    start: int
    stop: int
    tensor: torch.Tensor


# (torch_dist key, layer or None, expert or None) -> row blocks
Slots = dict[tuple[str, Optional[int], Optional[int]], list[RowBlock]]


def parameter_slots(model_sd: dict[str, Any], own_storage: bool = False) -> Slots:
    """(torch_dist key, layer, expert) -> the row blocks that hold this rank's slice of that parameter
    (layer None outside the layer stack; expert, its global index, None but for per-expert tensors).

    By default each parameter is one block, the model's own tensor: filling the blocks fills the model.

    With ``own_storage`` the state dict's factories are applied in place, and every piece megatron-core
    would write as a view into a larger tensor (SwiGLU's ``linear_fc1``, saved as its gate and up
    halves) gets a storage of its own and becomes its own block. Filled that way, the state dict saves
    without the staging copy megatron-core makes of such views (half a shard for a SwiGLU model), and
    the model's fused tensors are never written: drop the model, and they are freed.
    """
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    slots: Slots = {}

    def block(name: str, item: Any) -> Any:
        data = getattr(item, "data", None)
        if not isinstance(data, torch.Tensor) or name.endswith("_extra_state"):
            return item
        match = _LAYER.match(name)
        expert = None
        if item.key.startswith(EXPERTS):
            expert = _expert_index(item)
        blocks = slots.setdefault((item.key, int(match.group(1)) if match else None, expert), [])
        if own_storage and isinstance(item, ShardedTensor) and not owns_storage(data):
            row = data[0].numel() if data.dim() > 1 else 1
            if not data.is_contiguous() or data.storage_offset() % row:
                raise AssertionError(f"{item.key}: a saved view that is not a block of rows")
            start = data.storage_offset() // row
            item.data = torch.empty_like(data, memory_format=torch.contiguous_format)
            blocks.append(RowBlock(start, start + len(data), item.data))
        else:
            blocks.append(RowBlock(0, len(data), data))
        return item

    if own_storage:
        apply_factories(model_sd)
    for name, value in model_sd.items():
        if isinstance(value, list):
            dict_list_map_inplace(lambda item, name=name: block(name, item), value)
        else:
            block(name, value)
    for blocks in slots.values():
        blocks.sort(key=lambda b: b.start)
    return slots


def _expert_index(item: Any) -> int:
    """The global expert index of a per-expert state-dict item: its offset on the expert axis, which
    follows the layer axis (layout.Tensor.stored_shape). A factory (an expert's SwiGLU ``linear_fc1``)
    holds the whole local parameter and says it through the pieces it builds."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if not isinstance(item, ShardedTensor):
        built = item.build()
        item = built if isinstance(built, ShardedTensor) else next(iter(nested_values(built)))
    return item.global_offset[1]


def owns_storage(tensor: torch.Tensor) -> bool:
    """megatron-core's own test before writing (``_clone_if_needed``): a tensor that does not span
    its whole storage is copied first."""
    return tensor.untyped_storage().size() == tensor.numel() * tensor.itemsize


def load_model(model, ckpt: Path) -> dict[str, Any]:
    """Load a checkpoint's model weights into ``model`` (resharding as needed); returns common state."""

    state = torch_dist.load({"model": model.sharded_state_dict()}, Path(ckpt))
    model.load_state_dict(state["model"], strict=True)
    return state


def causal_mask(seq: int, device: torch.device | None = None) -> torch.Tensor:
    """Megatron's attention mask convention: True where a query may NOT attend (the future)."""
    return torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=device), diagonal=1)[None, None]


def causal_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits [batch, seq, vocab/TP] of this rank's vocab slice (explicit causal mask)."""
    model.eval()
    batch, seq = tokens.shape
    positions = torch.arange(seq, device=tokens.device).unsqueeze(0).expand(batch, seq)
    with torch.no_grad():
        return model(tokens, positions, causal_mask(seq, tokens.device))

