"""Model metrics: what a model costs (`counts`: parameters, MACs, sizes, sparsity) and how it trades accuracy
against that cost (`efficiency`: the paper's efficiency metric and breakpoints)."""

from .counts import (
    PRUNABLE,
    Macs,
    ParamCounts,
    count_macs,
    global_sparsity,
    layer_sparsity,
    param_counts,
    payload_bytes,
    serialized_bytes,
    sparse_encoded_bytes,
)
from .efficiency import (
    PARAMS_UNIT,
    Breakpoint,
    find_breakpoint,
    latency_breakpoint,
    latency_efficiency,
    performance_efficiency,
)

__all__ = [
    "ParamCounts", "param_counts", "Macs", "count_macs", "serialized_bytes", "payload_bytes",
    "sparse_encoded_bytes", "layer_sparsity", "global_sparsity", "performance_efficiency",
    "latency_efficiency", "Breakpoint", "find_breakpoint", "latency_breakpoint", "PRUNABLE", "PARAMS_UNIT",
]
