"""The tiled sparse format: exact round trips, the stored layout, sizes and validation (no triton needed)."""

import dataclasses

import pytest
import torch

from kdexport.kernels.sparse_format import TILE_K, TiledSparseWeight, choose_encoding

SPARSITIES = (0.0, 0.5, 0.9, 0.99, 1.0)


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("encoding", ["bitmap", "index"])
@pytest.mark.parametrize("shape", [(1, 1), (70, 45), (64, 96), (3, 200)])
def test_round_trip_is_exact(shape, encoding, sparsity, pruned):
    w = pruned(shape, sparsity)
    f = TiledSparseWeight.from_dense(w, block_n=16, encoding=encoding)
    assert f.encoding == encoding and f.nnz == int(torch.count_nonzero(w))
    assert f.sparsity == pytest.approx(1 - f.nnz / w.numel())
    assert torch.equal(f.to_dense(), w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block_n", [16, 32, 64, 128])
def test_round_trip_keeps_dtype_and_block(dtype, block_n, pruned):
    w = pruned((130, 70), 0.8, dtype)
    for encoding in ("bitmap", "index"):
        f = TiledSparseWeight.from_dense(w, block_n, encoding)
        assert f.dtype == dtype and f.tile_grid == (-(-130 // block_n), 3)
        dense = f.to_dense()
        assert dense.dtype == dtype and torch.equal(dense, w)


def test_layout_of_a_hand_made_weight():
    w = torch.zeros(2, 33)
    w[0, 0], w[0, 31], w[1, 5], w[1, 32] = 1.0, 2.0, 3.0, 4.0  # column 31 is the sign bit of the word
    f = TiledSparseWeight.from_dense(w, block_n=16, encoding="bitmap")
    assert f.tile_grid == (1, 2) and f.offsets.tolist() == [0, 3, 4]
    assert f.values.tolist() == [1.0, 2.0, 3.0, 4.0]  # tile by tile, row-major inside a tile
    assert f.pattern[0, 0].item() == 1 - 2**31 and f.pattern[0, 1].item() == 1 << 5
    assert f.pattern[1].tolist() == [0, 1] + [0] * 14  # W[1, 32] is row 1, column 0 of tile (0, 1)
    assert f.pattern[0, 2:].eq(0).all()  # rows past out_features are zero padding

    g = TiledSparseWeight.from_dense(w, block_n=16, encoding="index")
    assert g.offsets.tolist() == [0, 3, 4] and g.values.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert g.pattern[0, :2].tolist() == [2, 1] and g.pattern[1, :2].tolist() == [0, 1]
    assert g.columns.tolist() == [0, 31, 5, 0]
    assert torch.equal(f.to_dense(), w) and torch.equal(g.to_dense(), w)


@pytest.mark.parametrize("encoding", ["bitmap", "index"])
def test_nbytes_counts_what_is_stored(encoding, pruned):
    w = pruned((100, 70), 0.9, torch.float16)
    f = TiledSparseWeight.from_dense(w, block_n=32, encoding=encoding)
    tiles, rows = 4 * 3, 12 * 32
    per_row = 4 if encoding == "bitmap" else 1  # an int32 word, or a uint8 count
    per_value = 2 if encoding == "bitmap" else 3  # fp16 value (+ a uint8 column)
    assert f.nbytes == f.nnz * per_value + rows * per_row + (tiles + 1) * 4
    assert f.nbytes < w.numel() * 2 / 3


def test_auto_picks_the_smaller_encoding(pruned):
    for sparsity, expected in ((0.0, "bitmap"), (0.5, "bitmap"), (0.95, "index"), (1.0, "index")):
        w = pruned((128, 128), sparsity)
        auto = TiledSparseWeight.from_dense(w, encoding="auto")
        sizes = {e: TiledSparseWeight.from_dense(w, encoding=e).nbytes for e in ("bitmap", "index")}
        assert auto.encoding == expected == min(sizes, key=sizes.get)
    # 32-column tiles: index wins once fewer than 3 of 32 weights per tile row are non-zero
    assert choose_encoding(nnz=2 * 64, tiles=1, block_n=64) == "index"
    assert choose_encoding(nnz=3 * 64, tiles=1, block_n=64) == "bitmap"


def test_to_moves_and_casts_values_only(pruned):
    f = TiledSparseWeight.from_dense(pruned((40, 40), 0.7))
    h = f.to(dtype=torch.float16)
    assert h.dtype == torch.float16 and torch.equal(h.pattern, f.pattern)
    assert torch.equal(h.to_dense(), f.to_dense().half())


def test_frozen(pruned):
    f = TiledSparseWeight.from_dense(pruned((4, 4), 0.5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.block_n = 32


@pytest.mark.parametrize(("weight", "kwargs", "error"), [
    (torch.zeros(2, 3, 4), {}, ValueError),
    (torch.zeros(4, 4, dtype=torch.int32), {}, TypeError),
    (torch.zeros(4, 4), {"block_n": 48}, ValueError),
    (torch.zeros(4, 4), {"encoding": "bsr"}, ValueError),
])
def test_from_dense_rejects_bad_input(weight, kwargs, error):
    with pytest.raises(error):
        TiledSparseWeight.from_dense(weight, **kwargs)


def test_constructor_checks_tensor_shapes_and_dtypes(pruned):
    f = TiledSparseWeight.from_dense(pruned((20, 40), 0.5), block_n=16)
    with pytest.raises(ValueError, match="offsets"):
        dataclasses.replace(f, offsets=f.offsets[:-1])
    with pytest.raises(ValueError, match="pattern"):
        dataclasses.replace(f, pattern=f.pattern.to(torch.uint8))  # an index pattern in a bitmap weight
    with pytest.raises(ValueError, match="columns"):
        dataclasses.replace(f, encoding="index", pattern=f.pattern.to(torch.uint8))  # no columns stored
    with pytest.raises(ValueError, match="block_k"):
        dataclasses.replace(f, block_k=2 * TILE_K)
    with pytest.raises(TypeError, match="values"):
        dataclasses.replace(f, values=f.values.to(torch.int64))
    with pytest.raises(ValueError, match="shape"):
        dataclasses.replace(f, shape=(0, 40))
