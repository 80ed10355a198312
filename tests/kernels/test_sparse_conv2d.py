"""The implicit-GEMM convolution against F.conv2d: interpreted on CPU tensors, compiled on a GPU if present."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from kdexport.kernels.sparse_conv2d import conv_weight_matrix, sparse_conv2d, sparse_conv2d_ref
from kdexport.kernels.sparse_format import TiledSparseWeight
from kdexport.kernels.sparse_matmul import ConvGeometry

pytest.importorskip("triton", reason="the kernel tests run Triton's interpreter: install triton")

# (kernel, stride, padding, dilation): ResNet's 3x3 and 7x7 stem, a strided 1x1 shortcut, and an odd one
GEOMETRIES = {
    "3x3": ((3, 3), (1, 1), (1, 1), (1, 1)),
    "3x3-s2": ((3, 3), (2, 2), (1, 1), (1, 1)),
    "7x7-s2-stem": ((7, 7), (2, 2), (3, 3), (1, 1)),
    "1x1-s2": ((1, 1), (2, 2), (0, 0), (1, 1)),
    "odd": ((3, 2), (2, 1), (1, 0), (1, 2)),
}


@pytest.fixture
def conv_operands(pruned):
    """conv_operands(batch, c, o, hw, kernel, sparsity, encoding, dtype) -> x, 4-D dense W, tiled W, bias."""

    def make(batch, c, o, hw, kernel, sparsity, encoding, dtype=torch.float32, seed=0):
        g = torch.Generator().manual_seed(seed + 1)
        dense = pruned((o, c * kernel[0] * kernel[1]), sparsity, dtype, seed).view(o, c, *kernel)
        tiled = TiledSparseWeight.from_dense(conv_weight_matrix(dense), 16, encoding)
        x = torch.randn(batch, c, *hw, generator=g).to(dtype)
        return x, dense, tiled, torch.randn(o, generator=g).to(dtype)

    return make


@pytest.mark.parametrize("encoding", ["bitmap", "index"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("name", GEOMETRIES)
def test_kernel_matches_conv2d(name, sparsity, encoding, launches, conv_operands):
    kernel, stride, padding, dilation = GEOMETRIES[name]
    x, dense, tiled, bias = conv_operands(2, 5, 20, (9, 7), kernel, sparsity, encoding)  # K = 5 x taps, odd
    y = sparse_conv2d(x, tiled, bias, kernel_size=kernel, stride=stride, padding=padding, dilation=dilation,
                      relu=True)
    assert_close(y, F.conv2d(x, dense, bias, stride, padding, dilation).relu(), rtol=1e-4, atol=1e-4)
    assert y.is_contiguous(memory_format=torch.channels_last)
    oh, ow = ConvGeometry(kernel, stride, padding, dilation).output_size(9, 7)
    assert launches == [(2 * oh * ow, 20, 5 * kernel[0] * kernel[1], encoding, "cpu", None)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_any_input_strides(layout, launches, conv_operands):
    x, dense, tiled, bias = conv_operands(2, 6, 24, (8, 8), (3, 3), 0.7, "bitmap")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.cat([x, x], dim=1)[:, ::2, 1:, :-1]  # every other channel, a cropped window
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    y = sparse_conv2d(x, tiled, bias, kernel_size=(3, 3), padding=(1, 1))
    assert_close(y, F.conv2d(x, dense, bias, padding=1), rtol=1e-4, atol=1e-4)
    assert len(launches) == 1


def test_one_output_pixel_takes_the_gemv_path(launches, conv_operands):
    x, dense, tiled, bias = conv_operands(1, 4, 70, (3, 3), (3, 3), 0.8, "index")
    y = sparse_conv2d(x, tiled, bias, kernel_size=(3, 3))
    assert y.shape == (1, 70, 1, 1) and launches[0][0] == 1
    assert_close(y, F.conv2d(x, dense, bias), rtol=1e-4, atol=1e-4)


def test_fp16_and_the_reference(launches, conv_operands):
    x, dense, tiled, bias = conv_operands(2, 8, 16, (6, 6), (3, 3), 0.5, "bitmap", torch.float16)
    y = sparse_conv2d(x, tiled, bias, kernel_size=(3, 3), padding=(1, 1))
    expected = F.conv2d(x.float(), dense.float(), bias.float(), padding=1)
    assert y.dtype == torch.float16 and len(launches) == 1
    assert_close(y.float(), expected, rtol=1e-3, atol=2e-2)
    geometry = ConvGeometry((3, 3), padding=(1, 1))
    assert_close(sparse_conv2d_ref(x.float(), tiled.to(dtype=torch.float32), bias.float(), geometry), expected)
    assert_close(sparse_conv2d(x, tiled, bias, kernel_size=(3, 3), padding=(1, 1), backend="torch").float(),
                 expected, rtol=1e-3, atol=2e-2)
    assert len(launches) == 1


def test_empty_batch(launches, conv_operands):
    x, _, tiled, _ = conv_operands(0, 3, 8, (5, 5), (3, 3), 0.5, "bitmap")
    y = sparse_conv2d(x, tiled, kernel_size=(3, 3), stride=(2, 2))
    assert y.shape == (0, 8, 2, 2) and launches == []


def test_validation_errors(conv_operands):
    x, _, tiled, bias = conv_operands(1, 3, 8, (5, 5), (3, 3), 0.5, "bitmap")
    cases = [
        (lambda: sparse_conv2d(x[:, :2], tiled, kernel_size=(3, 3)), "x must be \\(N, 3, H, W\\)"),
        (lambda: sparse_conv2d(x[0], tiled, kernel_size=(3, 3)), "x must be"),
        (lambda: sparse_conv2d(x[:, :, :2], tiled, kernel_size=(3, 3)), "smaller than"),
        (lambda: sparse_conv2d(x, tiled, kernel_size=(3, 3), stride=(0, 1)), "stride"),
        (lambda: sparse_conv2d(x, tiled, kernel_size=(3, 3), padding=(1,)), "two ints"),
        (lambda: sparse_conv2d(x, tiled, bias[:5], kernel_size=(3, 3)), "bias must be"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(TypeError, match="TiledSparseWeight"):
        sparse_conv2d(x, tiled.to_dense(), kernel_size=(3, 3))


def test_custom_op_passes_opcheck(conv_operands):
    x, _, tiled, bias = conv_operands(2, 3, 16, (6, 5), (3, 3), 0.5, "bitmap")
    args = (x, *tiled.tensors(), bias, 16, 27, tiled.block_n, tiled.block_k, tiled.encoding, [3, 3], [2, 1], [1, 1],
            [1, 1], True, "auto")
    torch.library.opcheck(torch.ops.kdexport.sparse_conv2d.default, args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("name", GEOMETRIES)
def test_compiled_conv_on_gpu(name, dtype, launches, conv_operands):
    kernel, stride, padding, dilation = GEOMETRIES[name]
    x, dense, tiled, bias = conv_operands(4, 48, 130, (15, 14), kernel, 0.8, "bitmap", dtype)
    x, dense, tiled, bias = x.cuda(), dense.cuda(), tiled.to("cuda"), bias.cuda()
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    expected = F.conv2d(x.float(), dense.float(), bias.float(), stride, padding, dilation)
    y = sparse_conv2d(x, tiled, bias, kernel_size=kernel, stride=stride, padding=padding, dilation=dilation)
    assert_close(y.float(), expected, **tol)
    assert launches[0][4] == "cuda"
