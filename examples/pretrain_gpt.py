#!/usr/bin/env python
"""Megatron GPT pretraining on megatron-core with Megatron-LM's flag names: the checkout's form of
``megaclone pretrain`` (megaclone/commands/pretrain.py, whose help shows both commands in full).

    torchrun --nproc_per_node 2 examples/pretrain_gpt.py --load runs/wide --finetune --use-checkpoint-args \\
        --tensor-model-parallel-size 2 --seq-length 256 --data-path runs/data/stdlib --split 98,2,0 \\
        --micro-batch-size 8 --train-iters 1000 --lr 1e-3 --save runs/wide-trained
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megaclone import cli  # noqa: E402  (torch-free: flags parse before any heavy import)
from megaclone.commands.pretrain import main  # noqa: E402

if __name__ == "__main__":
    cli.run(main)
