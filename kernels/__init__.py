"""Triton kernels that make weight-pruned (unstructured) students faster on NVIDIA GPUs.

`import kernels` needs neither triton nor CUDA: the kernels are compiled (or interpreted) on first use.
The functional op lives in `kernels.sparse_matmul` (not re-exported here, where its name would hide
the module).
"""

from .modules import SparseConv2d, SparseLinear, SparsifyConfig, sparsify_, sparsify_report
from .sparse_format import TiledSparseWeight

__all__ = ["SparseConv2d", "SparseLinear", "SparsifyConfig", "TiledSparseWeight", "sparsify_", "sparsify_report"]
