"""Tiled sparse weight format for unstructured (L1-pruned) weights, decoded tile by tile by the SpMM kernel.

The (out_features, in_features) weight W is cut into tiles of block_n rows x 32 columns (one 32-bit word
per tile row). Every tile stores its non-zeros in row-major order, all tiles back to back in `values`;
`offsets[t]` is where tile t starts. How a tile says *where* its non-zeros are depends on the encoding:

- ``bitmap``: one int32 word per tile row, bit c set iff W[row, c] != 0. A non-zero's slot in `values`
  is the tile offset + the popcount of all earlier bits, which the kernel computes in registers.
  Bytes per non-zero: itemsize + 1 / (8 * density)  (fp16 at 50% sparsity: 2.25; at 90%: 3.25).
- ``index``: one uint8 count per tile row plus a uint8 tile-local column per non-zero.
  Bytes per non-zero: itemsize + 1 + 1 / (32 * density)  (fp16 at 95% sparsity: 3.6; at 99%: 6.1).

``auto`` picks whichever is smaller: with 32-column tiles that is ``index`` above ~90.6% sparsity (the
break-even of 1 bit per element against 1 byte per non-zero would be 87.5% without the row counts).
Tiles are padded with zeros past the matrix edge, so the kernel never masks weight loads. Offsets are
int32: a matrix holds fewer than 2**31 non-zeros.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Encoding = Literal["bitmap", "index"]
ENCODINGS: tuple[str, ...] = ("bitmap", "index")
TILE_K = 32  # columns per tile: the bits of one bitmap word
BLOCK_NS = (16, 32, 64, 128)  # tl.dot needs >= 16; uint8 row counts and columns need <= 255
VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True, eq=False)
class TiledSparseWeight:
    """A pruned weight in tiles of block_n x block_k: non-zero values + a tile-local pattern + tile offsets.

    values:  (nnz,) float16/bfloat16/float32, tile after tile, row-major inside a tile.
    offsets: (tiles + 1,) int32; tile t = (tile_row, tile_col) in row-major order owns
             values[offsets[t]:offsets[t + 1]].
    pattern: (tiles, block_n): int32 bitmap words (``bitmap``) or uint8 non-zeros per row (``index``).
    columns: (nnz,) uint8 tile-local column of each non-zero (``index``); empty for ``bitmap``.
    """

    shape: tuple[int, int]
    block_n: int
    block_k: int
    encoding: Encoding
    values: Tensor
    offsets: Tensor
    pattern: Tensor
    columns: Tensor

    def __post_init__(self) -> None:
        # Metadata checks only: reading tensor data here would synchronise a GPU on every construction.
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise ValueError(f"shape must be (out_features, in_features) >= 1, got {self.shape}")
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        if self.block_n not in BLOCK_NS:
            raise ValueError(f"block_n must be one of {BLOCK_NS}, got {self.block_n}")
        if self.block_k != TILE_K:
            raise ValueError(f"block_k must be {TILE_K} (one bitmap word per tile row), got {self.block_k}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if self.values.dtype not in VALUE_DTYPES or self.values.dim() != 1:
            raise TypeError(f"values must be 1-D {VALUE_DTYPES}, got {self.values.dtype} {tuple(self.values.shape)}")
        tiles = self.num_tiles
        pattern_dtype = torch.int32 if self.encoding == "bitmap" else torch.uint8
        expected = {
            "offsets": (torch.int32, (tiles + 1,)),
            "pattern": (pattern_dtype, (tiles, self.block_n)),
            "columns": (torch.uint8, (self.values.numel() if self.encoding == "index" else 0,)),
        }
        for name, (dtype, shape) in expected.items():
            t = getattr(self, name)
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(f"{self.encoding} {name} must be {dtype} of shape {shape}, "
                                 f"got {t.dtype} of shape {tuple(t.shape)}")
        devices = {t.device for t in self.tensors()}
        if len(devices) != 1:
            raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")

    # ------------------------------------------------------------------------------------ conversion
    @classmethod
    def from_dense(cls, weight: Tensor, block_n: int = 64, encoding: str = "auto") -> TiledSparseWeight:
        """Encode a 2-D weight (its zeros are the pruned entries); values keep the weight's dtype."""
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
        if weight.dtype not in VALUE_DTYPES:
            raise TypeError(f"weight dtype must be one of {VALUE_DTYPES}, got {weight.dtype}")
        if encoding not in (*ENCODINGS, "auto"):
            raise ValueError(f"encoding must be 'auto' or one of {ENCODINGS}, got {encoding!r}")
        if block_n not in BLOCK_NS:
            raise ValueError(f"block_n must be one of {BLOCK_NS}, got {block_n}")
        weight = weight.detach()
        tiles = _to_tiles(weight, block_n)  # (T, block_n, 32)
        nonzero = tiles != 0
        values = tiles[nonzero]  # boolean indexing is row-major: tile after tile, row after row
        if values.numel() >= 2**31:
            raise ValueError(f"{values.numel()} non-zeros do not fit int32 offsets")
        per_tile = nonzero.sum(dim=(1, 2))
        offsets = torch.cat([per_tile.new_zeros(1), per_tile.cumsum(0)]).to(torch.int32)
        if encoding == "auto":
            encoding = choose_encoding(values.numel(), tiles.shape[0], block_n)
        lanes = torch.arange(TILE_K, device=weight.device)
        if encoding == "bitmap":
            words = (nonzero.long() << lanes).sum(-1)  # in [0, 2**32): wrap into int32's range
            pattern = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
            columns = torch.empty(0, dtype=torch.uint8, device=weight.device)
        else:
            pattern = nonzero.sum(-1).to(torch.uint8)
            columns = lanes.expand_as(nonzero)[nonzero].to(torch.uint8)
        return cls(tuple(weight.shape), block_n, TILE_K, encoding, values, offsets, pattern, columns)

    def to_dense(self) -> Tensor:
        """The dense (out_features, in_features) weight; from_dense(w).to_dense() equals w exactly."""
        tiles, rows = self.num_tiles, self.block_n
        lanes = torch.arange(TILE_K, dtype=torch.int32, device=self.device)
        if self.encoding == "bitmap":
            nonzero = ((self.pattern.unsqueeze(-1) >> lanes) & 1).bool()  # arithmetic shift keeps bit 31
        else:
            nonzero = torch.zeros(tiles * rows, TILE_K, dtype=torch.bool, device=self.device)
            row_of = torch.repeat_interleave(torch.arange(tiles * rows, device=self.device),
                                             self.pattern.reshape(-1).long())
            nonzero[row_of, self.columns.long()] = True
            nonzero = nonzero.view(tiles, rows, TILE_K)
        dense = torch.zeros(tiles, rows, TILE_K, dtype=self.dtype, device=self.device)
        dense[nonzero] = self.values
        return _from_tiles(dense, self.shape, self.block_n)

    # ------------------------------------------------------------------------------------ properties
    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def tile_grid(self) -> tuple[int, int]:
        """(tile rows, tile columns) = (ceil(out / block_n), ceil(in / block_k))."""
        return -(-self.shape[0] // self.block_n), -(-self.shape[1] // self.block_k)

    @property
    def num_tiles(self) -> int:
        n, k = self.tile_grid
        return n * k

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.shape[0] * self.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: values + offsets + pattern + columns."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.values, self.offsets, self.pattern, self.columns

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TiledSparseWeight:
        """A copy on `device` and/or with values cast to `dtype` (the pattern is unchanged)."""
        moved = {f: getattr(self, f).to(device) for f in ("offsets", "pattern", "columns")}
        return dataclasses.replace(self, values=self.values.to(device=device, dtype=dtype), **moved)


def choose_encoding(nnz: int, tiles: int, block_n: int) -> Encoding:
    """The smaller encoding: beyond the values, bitmap stores 4 bytes per tile row, index 1 + 1 per non-zero."""
    return "index" if tiles * block_n + nnz < 4 * tiles * block_n else "bitmap"


def _to_tiles(weight: Tensor, block_n: int) -> Tensor:
    """(N, K) -> (tiles, block_n, 32), zero-padded, tiles in row-major order of the tile grid."""
    n, k = weight.shape
    tn, tk = -(-n // block_n), -(-k // TILE_K)
    padded = torch.nn.functional.pad(weight, (0, tk * TILE_K - k, 0, tn * block_n - n))
    return padded.view(tn, block_n, tk, TILE_K).permute(0, 2, 1, 3).reshape(tn * tk, block_n, TILE_K)


def _from_tiles(tiles: Tensor, shape: tuple[int, int], block_n: int) -> Tensor:
    n, k = shape
    tn, tk = -(-n // block_n), -(-k // TILE_K)
    full = tiles.view(tn, tk, block_n, TILE_K).permute(0, 2, 1, 3).reshape(tn * block_n, tk * TILE_K)
    return full[:n, :k].contiguous()
