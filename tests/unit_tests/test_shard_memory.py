"""The memory invariant behind the expander's peak: the state dict it saves holds no view that
megatron-core would copy before writing (a SwiGLU fc1 is filled as its gate and up halves, each in
storage of its own). Runs the library in this process as a world of one (gloo)."""

import gc
import weakref

from megaclone.model import (
    build_gpt,
    model_sharded_state_dict,
    owns_storage,
    parameter_slots,
)
from megaclone.shape import presets

FC1 = "decoder.layers.mlp.linear_fc1.weight"


def saved_tensors(sd):
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return [v for v in nested_values(sd) if isinstance(v, ShardedTensor)]


def build(spec):
    from megaclone.runtime import init_distributed, init_parallel

    init_distributed("cpu")
    init_parallel(1)
    return build_gpt(spec)


def test_saved_pieces_own_their_storage_and_the_fused_tensor_is_freed():
    spec = presets.preset_spec("llama", 1)
    assert spec.swiglu
    model = build(spec)
    fused = weakref.ref(model.decoder.layers[0].mlp.linear_fc1.weight)
    sd = model_sharded_state_dict(model)
    slots = parameter_slots(sd, own_storage=True)

    gate, up = slots[(FC1, 0, None)]
    f = spec.ffn_hidden_size
    assert (gate.start, gate.stop, up.start, up.stop) == (0, f, f, 2 * f)
    assert all(owns_storage(t.data) for t in saved_tensors(sd))
    blocks = [b.tensor for slot in slots.values() for b in slot]
    assert sum(b.numel() for b in blocks) == sum(t.data.numel() for t in saved_tensors(sd))

    # the state dict alone holds the shard: dropping the model frees the fused tensors
    del model, slots, blocks
    gc.collect()
    assert fused() is None


def test_default_slots_are_the_model_parameters():
    spec = presets.preset_spec("llama", 1)
    model = build(spec)
    slots = parameter_slots(model_sharded_state_dict(model))
    [block] = slots[(FC1, 0, None)]
    assert block.tensor.data_ptr() == model.decoder.layers[0].mlp.linear_fc1.weight.data_ptr()
    # megatron-core would save this fused tensor as two views, and copy them before writing
    from megatron.core.dist_checkpointing.mapping import apply_factories

    sd = model_sharded_state_dict(model)
    apply_factories(sd)
    assert not all(owns_storage(t.data) for t in saved_tensors(sd))
