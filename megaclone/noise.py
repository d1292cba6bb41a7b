"""Counter-based Gaussian noise: a pure function of (seed, parameter, layer, element, blocks).

The draw for destination element (i, j) depends only on the source element (i', j') it clones, its
output block and its input block, never on the rank, TP size or order of work, so every rank computes
its own slice alone and zero-sum partners (the c_in input blocks of one element) always agree.
"""

from __future__ import annotations

import zlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_TWO_PI = 2.0 * np.pi


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a bijective, well-mixing hash of uint64 values (wraps mod 2**64)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def stream_key(seed: int, param_key: str, layer: int) -> np.uint64:
    """One 64-bit key per (seed, parameter, layer); crc32 keeps it stable across processes."""
    x = np.array([seed & 0xFFFFFFFF, zlib.crc32(param_key.encode()), layer + 1], dtype=np.uint64)
    k = np.uint64(0)
    for v in x:
        k = _mix(np.array([k ^ v], dtype=np.uint64))[0]
    return k


def standard_normal(key: np.uint64, counters: np.ndarray) -> np.ndarray:
    """N(0, 1) float64 draws, one per uint64 counter (Box-Muller on one 64-bit hash)."""
    with np.errstate(over="ignore"):
        h = _mix(_mix(counters.astype(np.uint64) ^ key))
    u1 = ((h >> np.uint64(32)).astype(np.float64) + 0.5) * 2.0**-32
    u2 = (h & np.uint64(0xFFFFFFFF)).astype(np.float64) * 2.0**-32
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(_TWO_PI * u2)


def zero_sum_noise(
    key: np.uint64,
    src_rows: np.ndarray,
    out_block: np.ndarray,
    src_cols: np.ndarray,
    in_block: np.ndarray,
    src_num_cols: int,
    c_out: int,
    c_in: int,
) -> np.ndarray:
    """Unit-variance noise [len(rows), len(cols)] that sums to zero over the c_in input blocks.

    Element (r, c) belongs to the group (src_rows[r], out_block[r], src_cols[c]); the c_in members of
    a group (in_block 0..c_in-1) are drawn together, centred and rescaled to unit variance, so
    sum over input blocks of noise * x = 0 when the input is x cloned c_in times.
    """
    rows = src_rows.astype(np.uint64)[:, None]
    cols = src_cols.astype(np.uint64)[None, :]
    group = ((rows * np.uint64(src_num_cols) + cols) * np.uint64(c_out) + out_block.astype(np.uint64)[:, None])
    counters = group[..., None] * np.uint64(c_in) + np.arange(c_in, dtype=np.uint64)
    z = standard_normal(key, counters)
    own = np.take_along_axis(z, np.broadcast_to(in_block[None, :, None], z.shape[:2] + (1,)), axis=-1)[..., 0]
    return (own - z.mean(axis=-1)) * np.sqrt(c_in / (c_in - 1))
