"""checkpoint.BoxReader (each rank reading its own boxes through torch DCP) against megatron-core's
own loader, in this process as a world of one (gloo), on a real source checkpoint."""

import shutil

import numpy as np
import pytest
import torch

from megaclone import sample
from megaclone.errors import MegacloneError
from megaclone.formats import iterations, torch_dist
from megaclone.formats.base import Box, BoxRead
from megaclone.shape import presets


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    from megatron.core import dist_checkpointing

    from megaclone.runtime import init_distributed

    init_distributed("cpu")
    root = tmp_path_factory.mktemp("reader") / "src"
    sample.make_source(root, presets.preset_spec("llama", 1), train_steps=1)
    ckpt = torch_dist.find_checkpoint(root)
    full = {k: v for k, v in dist_checkpointing.load_plain_tensors(str(ckpt)).items() if isinstance(v, torch.Tensor)}
    return ckpt, full


def random_box(rng, shape):
    offsets = tuple(int(rng.integers(0, n)) for n in shape)
    lengths = tuple(int(rng.integers(1, n - o + 1)) for o, n in zip(offsets, shape))
    return Box(offsets, lengths)


@pytest.mark.parametrize("whole_chunks", [True, False])
def test_boxes_equal_megatron_core_load(stored, whole_chunks):
    """Random boxes of every tensor, each read twice in a row (the second from the chunks the reader
    holds), equal megatron-core's own load; also with every chunk read item by item."""
    ckpt, full = stored
    reader = torch_dist.BoxReader(ckpt)
    if not whole_chunks:
        reader.WHOLE_CHUNK_LIMIT = 0
    rng = np.random.default_rng(0)
    reads, expected = [], []
    for key, tensor in sorted(full.items()):
        stacked = key.startswith("decoder.layers.")
        layer = int(rng.integers(0, tensor.shape[0])) if stacked else None
        whole = tensor[layer] if stacked else tensor
        boxes = tuple(random_box(rng, whole.shape) for _ in range(3))
        reads.append(BoxRead(key, layer, boxes))
        expected.append([whole[tuple(slice(o, o + n) for o, n in zip(b.offsets, b.lengths))] for b in boxes])
    for read, refs in [pair for pair in zip(reads, expected) for _ in range(2)]:
        boxes = reader.read(read)
        assert len(boxes) == len(refs)
        for box, value, ref in zip(read.boxes, boxes, refs):
            assert value.shape == box.lengths and value.dtype == ref.dtype
            assert torch.equal(value, ref), (read.key, read.layer, box)


def test_box_outside_the_stored_tensor_is_refused(stored):
    ckpt, full = stored
    key = "embedding.word_embeddings.weight"
    rows, cols = full[key].shape
    with pytest.raises(MegacloneError, match="do not cover"):
        torch_dist.BoxReader(ckpt).read(BoxRead(key, None, (Box((rows - 1, 0), (2, cols)),)))


def test_the_common_state_as_megatron_core_0_19_stores_it_is_read(stored, tmp_path):
    """megatron-core 0.19 keeps the common state as one ShardedObject ('common_state', data packed by
    its torch strategy) instead of common.pt. The same source saved that way, through megatron-core's
    own ShardedObject path with common.pt removed (or by 0.19 itself), gives the same args, loads as the same model
    (verify: the logits equal the common.pt form's) and grows into a clone of it."""
    from megatron.core.dist_checkpointing import ShardedObject

    from megaclone.check.logits import verify
    from megaclone.formats.torch_dist import open_torch_dist_source
    from megaclone.model import build_gpt
    from megaclone.pipeline.expand import expand
    from megaclone.shape.request import Factors

    ckpt, _ = stored
    source = open_torch_dist_source(ckpt.parent)
    model = build_gpt(source.spec)
    common = torch_dist.load({"model": model.sharded_state_dict()}, ckpt)
    model.load_state_dict(common.pop("model"), strict=True)
    new_root = tmp_path / "mcore-0.19"
    new = new_root / ckpt.name
    torch_dist.save_sharded(new, {"model": model.sharded_state_dict(), **common})
    if (new / torch_dist.COMMON_FILE).exists():  # this megatron-core writes common.pt: store the object by hand
        shutil.rmtree(new)
        state = {"model": model.sharded_state_dict(),
                 torch_dist.COMMON_OBJECT: ShardedObject(torch_dist.COMMON_OBJECT, common, (1,), (0,), replica_id=0)}
        torch_dist.save_sharded(new, state)
        (new / torch_dist.COMMON_FILE).unlink()  # what it writes beside the object: the (empty) rest
    assert not (new / torch_dist.COMMON_FILE).exists()
    iterations.mark_latest(new_root, iterations.read_tracker(ckpt.parent))

    assert vars(torch_dist.read_common(new)["args"]) == vars(torch_dist.read_common(ckpt)["args"])
    assert all(r.ok and r.max_abs == 0.0 for r in verify(ckpt.parent, new_root))
    expand(new_root, tmp_path / "wide", Factors.uniform(2), 1)
    assert all(r.ok for r in verify(new_root, tmp_path / "wide"))


@pytest.mark.parametrize("made_by", ["mcore-0.16.1", "mcore-0.19.2"])
def test_a_source_saved_by_either_megatron_core_grows(made_by, tmp_path):
    """Stored sources (tests/data, tools/make_source.py --preset llama --num-layers 1 --dtype
    bfloat16) saved by megatron-core 0.16.1 (common state in common.pt) and by 0.19.2 (inside the
    shards, no common.pt), read by whichever megatron-core is installed: each grows 2x into a clone
    whose logits equal the source's, and the stored source is left as it was."""
    from util import ROOT, tree_hash

    from megaclone.check.logits import verify
    from megaclone.pipeline.expand import expand
    from megaclone.shape.request import Factors

    src = ROOT / "tests" / "data" / made_by
    assert (torch_dist.find_checkpoint(src) / torch_dist.COMMON_FILE).exists() == (made_by == "mcore-0.16.1")
    before = tree_hash(src)
    expand(src, tmp_path / "wide", Factors.uniform(2), 1)
    reports = verify(src, tmp_path / "wide")
    assert reports and all(r.ok for r in reports), reports
    assert tree_hash(src) == before


@pytest.mark.parametrize("made_by", ["mcore-0.16.1", "mcore-0.19.2"])
def test_a_checkpoint_is_described_without_megatron_core(made_by):
    """tools/inspect_checkpoint.py's summary (args and every tensor's shape and dtype) reads the
    common state and torch DCP's metadata with torch alone: megatron-core (seconds of imports) is not
    loaded. The tensors listed are the ones the layout catalogue expects of that shape."""
    import subprocess
    import sys

    from util import ROOT

    from megaclone.formats.torch_dist import open_torch_dist_source
    from megaclone.shape.layout import catalogue

    src = ROOT / "tests" / "data" / made_by
    code = ("import sys; from megaclone.formats.describe import describe; print(describe(sys.argv[1])); "
            "print('megatron loaded:', any(m.split('.')[0] == 'megatron' for m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(src)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.rstrip().endswith("megatron loaded: False"), proc.stdout
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ") and "=" not in line}
    assert listed == {entry.key for entry in catalogue(open_torch_dist_source(src).spec)}
