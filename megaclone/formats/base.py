"""The one reader interface: a ``Source`` is any checkpoint megaclone reads (torch_dist, legacy
torch, Hugging Face), validated before anything is written, that returns any box of any Megatron
tensor. Each format's module opens its own kind (``torch_dist``, ``legacy``, ``hf.reader``);
``formats.source.open_source`` picks one by what a path holds. No cloning here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from megaclone.formats import Format
from megaclone.shape.spec import ModelSpec


@dataclass(frozen=True)
class Box:
    """A rectangle of a source tensor: per-axis (offset, length), layer axis excluded."""

    offsets: tuple[int, ...]
    lengths: tuple[int, ...]

    @classmethod
    def whole(cls, shape: tuple[int, ...]) -> "Box":
        return cls(tuple(0 for _ in shape), tuple(shape))

    @property
    def numel(self) -> int:
        return int(np.prod(self.lengths))


@dataclass(frozen=True)
class BoxRead:
    """Boxes of one source tensor, of one layer of it when stacked (``layer`` None otherwise)."""

    key: str
    layer: Optional[int]
    boxes: tuple[Box, ...]

    @property
    def numel(self) -> int:
        return sum(b.numel for b in self.boxes)


def keyed_runs(key: np.ndarray, index: np.ndarray) -> Iterator[tuple[int, int]]:
    """Maximal position ranges [a, b) over which ``key`` is constant and ``index`` steps by one
    (e.g. rows that come from one file or tensor, consecutively)."""
    start = 0
    for i in range(1, len(key) + 1):
        if i == len(key) or key[i] != key[start] or index[i] != index[i - 1] + 1:
            yield start, i
            start = i


@dataclass(frozen=True)
class TensorMeta:
    """A stored global tensor: its full shape (layer axis first when stacked) and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype


Reader = Callable[[BoxRead], list[torch.Tensor]]


@dataclass(frozen=True)
class Source:
    """A validated source: where it is, its spec and Megatron args, every tensor's global shape and
    dtype (torch_dist naming), and how to read boxes of them."""

    path: Path
    spec: ModelSpec
    args: object
    tensors: dict[str, TensorMeta]
    dtype: torch.dtype
    read: Reader
    format: Format = Format.TORCH_DIST
    clone_record: Optional[dict] = None  # what megaclone recorded if it wrote this checkpoint (factors, depth...)
