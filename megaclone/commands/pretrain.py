"""Megatron GPT pretraining on megatron-core with Megatron-LM's flag names (CPU + gloo or CUDA + NCCL).

From scratch:
    torchrun --nproc_per_node 2 examples/pretrain_gpt.py --tensor-model-parallel-size 2 \\
        --num-layers 4 --hidden-size 256 --num-attention-heads 8 --seq-length 256 \\
        --data-path runs/data/stdlib --split 98,2,0 --micro-batch-size 8 --train-iters 1000 --lr 1e-3 \\
        --save runs/small
Continue from a checkpoint tools/expand_sharded.py grew (fresh optimizer, iteration 0; the first
iteration's loss is printed next to the source model's loss on the same batch):
    torchrun --nproc_per_node 2 examples/pretrain_gpt.py --load runs/wide --finetune --use-checkpoint-args \\
        --tensor-model-parallel-size 2 --seq-length 256 --data-path runs/data/stdlib --split 98,2,0 \\
        --micro-batch-size 8 --train-iters 1000 --lr 1e-3 --save runs/wide-trained
(installed: ``megaclone pretrain ...``)
"""

from megaclone import cli  # torch-free: flags parse before any heavy import


def main() -> int:
    from megaclone.train.args import build_parser, refuse_early

    args = cli.parse(build_parser())  # before torch is imported: --help and flag errors come at once
    from megaclone import launch

    refuse_early(args, launch.world_size())  # flag refusals, still before torch
    from megaclone.runtime import init_distributed
    from megaclone.train.loop import pretrain

    rt = init_distributed(args.device, args.timeout_minutes)
    pretrain(args, rt)
    return 0
