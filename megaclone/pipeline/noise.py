"""Counter-based Gaussian noise: a pure function of (seed, parameter, layer, element, blocks).

The draw for destination element (i, j) depends only on the source element (i', j') it clones, its
output block and its input pair, never on the rank, TP size or order of work, so every rank computes
its own slice alone and the two input blocks of a pair (+z and -z) always agree.
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


def pairs(c_in: int) -> int:
    """Noise pairs among ``c_in`` input blocks: (0, 1), (2, 3), ...; an odd last block has none."""
    return c_in // 2


def _pair_counters(src_rows: np.ndarray, out_block: np.ndarray, src_cols: np.ndarray, pair: np.ndarray,
                   src_num_cols: int, c_out: int, c_in: int) -> np.ndarray:
    """One counter per (source row, output block, source column, pair): [len(rows), len(cols)]."""
    rows = src_rows.astype(np.uint64)[:, None]
    cols = src_cols.astype(np.uint64)[None, :]
    group = (rows * np.uint64(src_num_cols) + cols) * np.uint64(c_out) + out_block.astype(np.uint64)[:, None]
    return group * np.uint64(max(pairs(c_in), 1)) + pair.astype(np.uint64)[None, :]


def paired_noise(
    key: np.uint64,
    src_rows: np.ndarray,
    out_block: np.ndarray,
    src_cols: np.ndarray,
    in_block: np.ndarray,
    src_num_cols: int,
    c_out: int,
    c_in: int,
) -> np.ndarray:
    """Unit-variance draws [len(rows), len(cols)] laid out as the authors' code adds noise: input
    blocks 2p and 2p+1 of an element get +z and -z of one draw z (pair p), an odd last block none.

    The draw depends on (source row, output block, source column, pair) only, so the ``c_in`` input
    copies of an element sum to zero and every rank computes its slice alone."""
    pair = np.minimum(in_block // 2, max(pairs(c_in) - 1, 0))
    sign = np.where(in_block % 2 == 0, 1.0, -1.0) * (in_block < 2 * pairs(c_in))
    z = standard_normal(key, _pair_counters(src_rows, out_block, src_cols, pair, src_num_cols, c_out, c_in))
    return z * sign[None, :]


def draw_sum_of_squares(key: np.uint64, src_rows: np.ndarray, block: int, pair: int, src_num_cols: int,
                        c_out: int, c_in: int) -> float:
    """Sum of z^2 of pair ``pair``'s draws over ``src_rows`` x every source column in output block
    ``block``: what the noise of that block measures before it is scaled."""
    cols = np.arange(src_num_cols)
    counters = _pair_counters(src_rows, np.full(len(src_rows), block), cols, np.full(len(cols), pair),
                              src_num_cols, c_out, c_in)
    return float(np.square(standard_normal(key, counters)).sum())


def noise_scale(signal_power: np.ndarray, draws_mean_square: np.ndarray, c_in: int, snr_db: float) -> np.ndarray:
    """The factor on each noise block's draws that makes its power exactly the cloned block's,
    mean((W_S/c_in)^2), over 10^(snr/10) (the authors' definition, measured against the block that
    is perturbed). ``signal_power`` [units]; ``draws_mean_square`` [units, c_out, pairs]."""
    target = np.asarray(signal_power, dtype=np.float64) / c_in**2 * 10.0 ** (-snr_db / 10.0)
    return np.sqrt(target[:, None, None] / draws_mean_square)
