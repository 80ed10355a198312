"""Triton kernels that make weight-pruned (unstructured) students faster on NVIDIA GPUs.

`import kdexport.kernels` needs neither triton nor CUDA: the kernels are compiled (or interpreted) on first use.
The functional ops live in `kdexport.kernels.sparse_matmul` and `.sparse_conv2d` (the same kernel as an
implicit-GEMM convolution); they are not re-exported here, where their names would hide the modules.
"""

from .errors import KernelConfigError
from .modules import SparseConv2d, SparseLinear, SparsifyConfig, sparsify_, sparsify_report
from .sparse_format import TiledSparseWeight

__all__ = ["KernelConfigError", "SparseConv2d", "SparseLinear", "SparsifyConfig", "TiledSparseWeight", "sparsify_",
           "sparsify_report"]
