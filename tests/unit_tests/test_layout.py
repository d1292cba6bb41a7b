"""The layout catalogue against megatron-core itself: for GPTs of several shapes, the catalogue's keys
and stored shapes are exactly those of ``GPTModel.sharded_state_dict()``, and its TP splits are the
``partition_dim`` megatron-core's parallel layers give their parameters (a world of one, gloo)."""

import dataclasses
import re

import pytest

from megaclone.shape import presets
from megaclone.shape.layout import EXPERTS, LAYERS, LOCAL_SPEC_NAMES, Split, catalogue
from megaclone.shape.spec import Experts

SHAPES = {
    "llama": {},
    "gpt2": {},
    "llama-learned-positions-tied": dict(position_embedding_type="learned_absolute",
                                         untie_embeddings_and_output_weights=False),
    "gpt2-gelu-qkv-bias-only": dict(add_bias_linear=False, add_qkv_bias=True),
    "llama-qk-layernorm": dict(qk_layernorm=True),
    "gpt2-qk-layernorm": dict(qk_layernorm=True),
    "llama-experts": dict(experts=Experts(4, 2, ffn_hidden_size=96)),
    "llama-granular-experts-qk-layernorm": dict(experts=Experts(8, 4, ffn_hidden_size=24), qk_layernorm=True),
    "llama-experts-gated-shared-expert": dict(experts=Experts(4, 2, ffn_hidden_size=48, shared_ffn_hidden_size=64,
                                                              shared_gate=True)),
}


@pytest.fixture(scope="module")
def world():
    from megaclone.runtime import init_distributed, init_parallel

    init_distributed("cpu")
    init_parallel(1)


def megatron_layout(spec):
    """(key -> stored shape, key -> TP split) as megatron-core's model states them."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from megaclone.model import build_gpt

    model = build_gpt(spec, initialize=True)  # megatron-core marks TP-split parameters as it initializes them
    sd = model.sharded_state_dict()
    apply_factories(sd)
    shapes = {}
    for value in sd.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, ShardedTensor) and not item.key.endswith("_extra_state"):
                assert shapes.setdefault(item.key, item.global_shape) == item.global_shape
    splits = {}
    for name, param in model.named_parameters():
        key = name
        if name.startswith(LAYERS):
            suffix = re.sub(r"^mlp\.experts\.local_experts\.\d+\.", "mlp.experts.experts.", name.split(".", 3)[3])
            key = LAYERS + {v: k for k, v in LOCAL_SPEC_NAMES.items()}.get(suffix, suffix)
        if not getattr(param, "tensor_model_parallel", False):
            splits[key] = Split.REPLICATED
        elif key == "embedding.word_embeddings.weight":
            splits[key] = Split.VOCAB
        else:
            splits[key] = {0: Split.COLUMN, 1: Split.ROW}[param.partition_dim]
    return shapes, splits


@pytest.mark.parametrize("name", SHAPES)
def test_the_catalogue_is_megatron_cores_layout(world, name):
    base = "llama" if name.startswith("llama") else "gpt2"
    spec = dataclasses.replace(presets.preset_spec(base, 1), **SHAPES[name])
    shapes, splits = megatron_layout(spec)
    entries = {t.key: t for t in catalogue(spec)}
    assert set(entries) == set(shapes)
    for key, t in entries.items():
        assert t.stored_shape(spec.num_layers) == tuple(shapes[key]), key
        assert t.split is splits[key], key
    fc1 = EXPERTS + "linear_fc1.weight" if spec.experts else LAYERS + "mlp.linear_fc1.weight"
    assert entries[fc1].parts == (2 if spec.swiglu else 1)
