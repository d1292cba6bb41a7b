"""torchrun worker: megatron-core's RNG tracker on this device draws per-TP-rank masks inside
tensor-parallel regions and shared ones outside, as Megatron-LM seeds it; dropout acts in training
mode only. Writes results.json into the directory given as the first argument."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megaclone.shape import presets  # noqa: E402
from megaclone.model import build_gpt, causal_logits, causal_mask  # noqa: E402
from megaclone.runtime import init_distributed, init_parallel  # noqa: E402


def gathered(t: torch.Tensor) -> list[list[float]]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return [p.tolist() for p in parts]


def main(out: Path) -> None:
    from megatron.core import tensor_parallel

    init_distributed("cpu")
    init_parallel(dist.get_world_size())
    torch.manual_seed(5)
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    outside = torch.rand(6)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        inside = torch.rand(6)
    after = torch.rand(6)  # the default stream continues where it was, untouched by the fork

    draws = {"outside": gathered(outside), "inside": gathered(inside), "after": gathered(after)}

    spec = presets.preset_spec("llama", dist.get_world_size())
    model = build_gpt(spec, initialize=True, hidden_dropout=0.3, attention_dropout=0.3)
    tokens = torch.arange(16).view(1, 16)
    positions = torch.arange(16).view(1, 16)
    model.train()
    with torch.no_grad():
        first, second = (model(tokens, positions, causal_mask(16)) for _ in range(2))
    evals = [causal_logits(model, tokens) for _ in range(2)]  # causal_logits switches to eval mode
    if dist.get_rank() == 0:
        results = dict(draws, train_differs=not torch.equal(first, second), eval_equal=torch.equal(*evals))
        (out / "results.json").write_text(json.dumps(results))
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
