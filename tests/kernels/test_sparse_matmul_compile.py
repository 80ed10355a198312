"""The SpMM kernel compiled ahead of time for real NVIDIA targets, on a machine without a GPU.

Triton's whole NVIDIA pipeline runs (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) for every autotune config
the kernel can pick, and the bundled cuobjdump reads the cubin's resources. That is as far as CPU CI can
follow the compiled kernel; its numbers and speed need a GPU (the `gpu` tests, benchmarks/bench_spmm.py).
What it does establish, per target, dtype and weight encoding:
- every config compiles and its shared memory fits the target's per-block limit;
- for every row-count bucket (_block_m_choices) at least one candidate config runs without register spills,
  so the autotuner, which times the candidates on the device, always has a spill-free one to choose;
- the same for the implicit-GEMM convolution (CONV, a 3x3 window);
- tl.dot lowers to tensor-core MMA exactly where expected (fp16/bf16/tf32 on sm_80+; not for IEEE fp32,
  not on Turing, where Triton's dot is FMAs), popcount to `popc`, and split-K to global atomic adds only.

Compiling needs a process whose triton was imported without TRITON_INTERPRET=1 (see
kernels.sparse_matmul.triton_mode), so the compiles run in one child: this file run as a script.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from kdexport.kernels import sparse_matmul as sm

pytest.importorskip("triton", reason="compiling the kernel needs triton")

# Opt-in shared memory per block (bytes), CUDA programming guide, compute capabilities table.
SHARED_LIMIT = {75: 64 << 10, 80: 163 << 10, 86: 99 << 10, 87: 163 << 10, 89: 99 << 10, 90: 227 << 10}
# (arch, dtype, precision, encoding, block_n, conv): Hopper (H100/H200), Jetson Orin, A100 IEEE fp32 and bf16,
# Turing laptops; a laptop Ampere (sm_86) and Ada (sm_89) at the default block. conv: the implicit-GEMM 3x3.
GROUPS = [
    (90, "fp16", "tf32", "bitmap", 64, False), (90, "fp16", "tf32", "index", 64, False),
    (90, "fp16", "tf32", "bitmap", 128, False), (90, "fp16", "tf32", "bitmap", 64, True),
    (87, "fp16", "tf32", "bitmap", 64, False), (87, "fp16", "tf32", "index", 64, False),
    (87, "fp16", "tf32", "index", 64, True),
    (80, "fp32", "ieee", "bitmap", 64, False), (80, "fp32", "tf32", "index", 64, False),
    (80, "bf16", "tf32", "bitmap", 64, False),
    (75, "fp16", "tf32", "bitmap", 64, False), (86, "fp16", "tf32", "index", 64, False),
    (89, "fp16", "tf32", "bitmap", 64, False),
]
CONFIGS = sm.GEMM_CONFIGS + sm.GEMV_CONFIGS
SPLIT_K = [(90, "fp16", "tf32", "bitmap", 64, False, 16), (90, "fp16", "tf32", "index", 64, False, 1),
           (87, "fp32", "ieee", "bitmap", 64, False, 16)]  # (group..., block_m) at split_k 4, with its best config


def _compile(arch: int, dtype: str, precision: str, encoding: str, block_n: int, conv: bool, block_m: int,
             num_warps: int, num_stages: int, split_k: int) -> dict:
    """Compile one variant (in the child) and read what the cubin and PTX say."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.compiler.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    sm._triton()
    kernel = JITFunction(sm._sparse_matmul_kernel)
    pattern = "*i32" if encoding == "bitmap" else "*u8"
    pointers = [f"*{dtype}", f"*{dtype}", "*i32", pattern, "*u8", f"*{dtype}", "*fp32" if split_k > 1 else f"*{dtype}"]
    signature = dict(zip(kernel.arg_names[:21], pointers + ["i32"] * 14, strict=True))
    constants = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=32, GROUP_M=sm.GROUP_M, SPLIT_K=split_k,
                     BITMAP=encoding == "bitmap", HAS_BIAS=True, RELU=split_k == 1,
                     POPCOUNT=JITFunction(sm._popcount_hw), PRECISION=precision, CONV=conv,
                     KW=3 if conv else 1, SH=1, SW=1, PH=int(conv), PW=int(conv), DH=1, DW=1)
    signature.update(dict.fromkeys(constants, "constexpr"))
    target = GPUTarget("cuda", arch, 32)
    options = make_backend(target).parse_options({"num_warps": num_warps, "num_stages": num_stages})
    compiled = triton.compile(ASTSource(kernel, signature, constants), target=target, options=options.__dict__)
    cuobjdump = Path(triton.backends.nvidia.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    ptx = compiled.asm["ptx"]
    return dict(shared=compiled.metadata.shared, ptx_target=re.search(r"\.target (\w+)", ptx).group(1),
                **{k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage)},
                mma=sorted(set(re.findall(r"\b(?:wgmma|mma)\.[\w.]+", ptx))),
                atomics=sorted(set(re.findall(r"\b(?:atom|red)\.global\.[\w.]+", ptx))),
                popc="popc.b32" in ptx)


def _variants() -> list[tuple]:
    every = [(*group, *config, 1) for group, config in itertools.product(GROUPS, CONFIGS)]
    best = {bm: (bm, *next((nw, ns) for b, nw, ns in CONFIGS if b == bm)) for bm, *_ in CONFIGS}
    return every + [(*group, *best[bm], 4) for *group, bm in SPLIT_K]


@pytest.fixture(scope="module")
def compiled() -> dict[tuple, dict]:
    """Every variant compiled with TRITON_INTERPRET=0, in two child processes (CI has two cores)."""
    variants = _variants()
    shares = [variants[::2], variants[1::2]]
    children = [subprocess.Popen([sys.executable, __file__, json.dumps(share)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2],
                                 env={**os.environ, "TRITON_INTERPRET": "0"}) for share in shares]
    results = {}
    for child, share in zip(children, shares, strict=True):
        out, err = child.communicate(timeout=900)
        assert child.returncode == 0, err[-3000:]
        results.update({tuple(v): r for v, r in zip(share, json.loads(out), strict=True)})
    return results


def _spill_free(r: dict) -> bool:
    return r["stack"] == 0 and r["local"] == 0


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: "-".join(map(str, g)))
def test_every_config_compiles_and_each_row_bucket_has_a_spill_free_one(group, compiled):
    arch, dtype, precision, encoding, *_ = group
    results = {config: compiled[(*group, *config, 1)] for config in CONFIGS}
    tensor_cores = arch >= 80 and (dtype != "fp32" or precision == "tf32")
    for (block_m, *_), r in results.items():
        assert r["ptx_target"] in (f"sm_{arch}", f"sm_{arch}a"), r  # sm_90a: Hopper's wgmma/TMA
        assert 0 < r["shared"] <= SHARED_LIMIT[arch], r
        assert bool(r["mma"]) == (tensor_cores and block_m > 1), r
        assert r["popc"] == (encoding == "bitmap") and not r["atomics"], r
    for m in (1, 16, 32, 64, 65):
        candidates = [r for (bm, *_), r in results.items() if bm in sm._block_m_choices(m)]
        assert any(map(_spill_free, candidates)), f"every config for M={m} spills: {candidates}"


@pytest.mark.parametrize("variant", SPLIT_K, ids=lambda v: "-".join(map(str, v)))
def test_split_k_accumulates_with_global_atomics(variant, compiled):
    (r,) = [r for v, r in compiled.items() if v[:7] == variant and v[-1] == 4]
    assert r["atomics"] and all(".add.f32" in a for a in r["atomics"]), r
    assert _spill_free(r), r


if __name__ == "__main__":
    print(json.dumps([_compile(*v) for v in json.loads(sys.argv[1])]))
