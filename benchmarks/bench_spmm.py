"""Triton SpMM (kernels.sparse_matmul) against dense cuBLAS and torch's own sparse paths, on the weight shapes of
the paper's students; then the implicit-GEMM convolution against cuDNN and unfold; then a pruned ResNet-18.

For each weight (out x in), sparsity, number of rows N of X, dtype and encoding, Y = X @ W^T is timed in the
same run by every method a user could pick: dense cuBLAS (F.linear), our kernel (bitmap and index encodings),
torch.sparse CSR and BSR (W_sparse @ X^T) and 2:4 semi-structured (torch.sparse.to_sparse_semi_structured,
cuSPARSELt or CUTLASS; its own 50% 2:4 pattern, so one cell per layer and N). Timing is
triton.testing.do_bench: CUDA events, a warm-up, L2 flushed before every call, median and p10/p90. Speedup =
dense median / method median. Every result is checked against dense; a wrong result of our kernel is marked
WRONG and makes the exit status 1, a method that cannot run is recorded with its error, and the table goes on.
Then the 3x3 convolutions of ResNet-18 at 224x224 (dense cuDNN vs implicit GEMM vs F.unfold + SpMM), and the
batch-1 latency of a 90% weight-pruned ResNet-18, dense vs sparsify_'d, eager and as a CUDA graph.

    python benchmarks/bench_spmm.py --out spmm.json                       # fp16, all shapes
    python benchmarks/bench_spmm.py --dtypes float16 bfloat16 --encodings bitmap index --rows 1 16
    python benchmarks/bench_spmm.py --render spmm.json                    # the tables of a (partial) JSON
    TRITON_INTERPRET=1 python benchmarks/bench_spmm.py --dry-run          # CPU: tiny shapes, interpreted kernel
--out is rewritten after every layer, so a run cut short leaves the cells it measured. Without a CUDA GPU
(and without --dry-run) it exits 2 ("needs a CUDA GPU"). --dry-run checks the code paths and tables on CPU:
its timings are meaningless.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from spmm_tables import render  # noqa: E402

# (name, out_features, in_features); "head" rows are tiny classifiers, left out of the target check.
SHAPES = (
    ("resnet18 fc head", 10, 512),
    ("mobilenet fc head, 100 classes", 100, 1024),
    ("mobilenet pointwise 1x1 1024->1024", 1024, 1024),
    ("mobilenet pointwise 1x1 512->512", 512, 512),
    ("resnet18 layer4 3x3 conv (as a matrix)", 512, 4608),
    ("resnet50 bottleneck 1x1 512->2048", 2048, 512),
    ("resnet50 bottleneck 1x1 2048->512", 512, 2048),
    ("densenet169 transition2 1x1 512->256", 256, 512),
    ("densenet169 transition3 1x1 1280->640", 640, 1280),
    ("efficientnet_b0 head 1x1 320->1280", 1280, 320),
)
# (name, channels in = out, height = width): ResNet-18's 3x3 convs at 224x224 input, stride 1, padding 1
CONVS = (("resnet18 layer1 3x3 64", 64, 56), ("resnet18 layer2 3x3 128", 128, 28),
         ("resnet18 layer3 3x3 256", 256, 14), ("resnet18 layer4 3x3 512", 512, 7))
CONV_BATCHES = (1, 8)
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
ROWS = (1, 8, 16, 64)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
BASELINES = ("csr", "bsr", "semi24")
# --dry-run: CPU tensors, Triton's interpreter, shapes small enough for it
DRY = dict(shapes=(("dry run 64x96", 64, 96), ("dry run head 10x64", 10, 64)), convs=(("dry run 3x3 16", 16, 6),),
           conv_batches=(1,), rows=[1, 5], sparsities=[0.9], dtypes=["float32", "float16"])
MAX_REL_ERR = {"float16": 1e-2, "bfloat16": 3e-2, "float32": 1e-2}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", choices=sorted(DTYPES), nargs="+", default=["float16"])
    p.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    p.add_argument("--conv-sparsities", type=float, nargs="+", default=None, help="default: --sparsities")
    p.add_argument("--rows", type=int, nargs="+", default=list(ROWS), help="N, the rows of X (batch x pixels)")
    p.add_argument("--shapes", nargs="+", default=None, help="only shapes whose name contains one of these")
    p.add_argument("--block-n", type=int, default=64, help="rows per weight tile")
    p.add_argument("--encodings", choices=["bitmap", "index"], nargs="+", default=["bitmap", "index"])
    p.add_argument("--baselines", choices=BASELINES, nargs="*", default=list(BASELINES),
                   help="torch's sparse paths to time beside dense (none: --baselines with no value)")
    p.add_argument("--bsr-block", type=int, default=32, help="BSR block size (square)")
    p.add_argument("--warmup-ms", type=float, default=25, help="do_bench warm-up per timing")
    p.add_argument("--rep-ms", type=float, default=100, help="do_bench timed window per timing")
    p.add_argument("--e2e-size", type=int, default=32, help="ResNet-18 input height and width (e.g. 224)")
    p.add_argument("--no-layers", action="store_true", help="skip the SpMM layers")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end ResNet-18 latency")
    p.add_argument("--no-conv", action="store_true", help="skip the implicit GEMM vs im2col convolutions")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU: tiny shapes on CPU, the kernel interpreted; checks code paths, not speed")
    p.add_argument("--out", type=Path, default=None, help="write all results as JSON here (after every layer)")
    p.add_argument("--render", type=Path, default=None, help="print the tables of this JSON and exit")
    args = p.parse_args(argv)
    if args.dry_run:
        args.rows, args.sparsities, args.dtypes = DRY["rows"], DRY["sparsities"], DRY["dtypes"]
        args.no_e2e, args.warmup_ms, args.rep_ms = True, 0, 0
    args.conv_sparsities = args.conv_sparsities or args.sparsities
    return args


class Timer:
    """{"p50", "p10", "p90"} in ms: do_bench on CUDA; on CPU (dry run) three timed calls after measure()'s check."""

    def __init__(self, device: str, warmup_ms: float, rep_ms: float):
        self.device, self.warmup_ms, self.rep_ms = device, warmup_ms, rep_ms
        self.name = (f"triton.testing.do_bench (CUDA events, L2 flushed, warmup {warmup_ms} ms, rep {rep_ms} ms)"
                     if device == "cuda" else "time.perf_counter, 3 calls after 1 untimed (CPU dry run: meaningless)")

    def __call__(self, fn, cuda_graph: bool = False) -> dict[str, float]:
        if self.device == "cuda":
            from triton.testing import do_bench, do_bench_cudagraph

            if cuda_graph:
                p50, p10, p90 = do_bench_cudagraph(fn, rep=max(self.rep_ms, 20), quantiles=[0.5, 0.1, 0.9])
            else:
                p50, p10, p90 = do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, quantiles=[0.5, 0.1, 0.9])
            return {"p50": p50, "p10": p10, "p90": p90}
        times = []  # measure() has just called fn once to check it: that call is the warm-up
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        return {"p50": times[1], "p10": times[0], "p90": times[2]}


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()


def random_pruned(out_f: int, in_f: int, sparsity: float, dtype: torch.dtype, gen: torch.Generator,
                  device: str) -> torch.Tensor:
    """Unstructured L1 pruning of a random weight: the smallest |w| are zeroed, as prune.l1_unstructured does."""
    w = torch.randn(out_f, in_f, device=device, generator=gen)
    k = round(sparsity * w.numel())
    if k:
        w.view(-1)[w.abs().view(-1).topk(k, largest=False).indices] = 0
    return w.to(dtype)


def two_four(w: torch.Tensor) -> torch.Tensor:
    """W pruned to 2:4 by magnitude: the two largest |w| of every four consecutive inputs are kept."""
    groups = w.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().topk(2, dim=1).indices, True)
    return (groups * keep).reshape(w.shape)


def _error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def measure(cell: dict, fn, expected: torch.Tensor, timer: Timer, dense_ms: dict | None, max_err: float,
            transpose: bool = False) -> dict:
    """Fill `cell` with ms, speedup and rel_err of fn (or the error that stopped it)."""
    try:
        got = fn()
        cell["rel_err"] = rel_err(got.t() if transpose else got, expected)
        cell["wrong"] = not cell["rel_err"] < max_err
        cell["ms"] = timer(fn)
        if dense_ms:
            cell["speedup"] = dense_ms["p50"] / cell["ms"]["p50"]
    except Exception as exc:  # noqa: BLE001 - a method that cannot run is a table cell, not a crash
        cell["error"] = _error(exc)
    return cell


def bench_layer(args, name: str, out_f: int, in_f: int, dtype_name: str, timer: Timer) -> list[dict]:
    """Every (sparsity, N, method) cell of one weight shape and dtype."""
    from kdexport.kernels.sparse_format import TiledSparseWeight
    from kdexport.kernels.sparse_matmul import sparse_matmul

    dtype, device = DTYPES[dtype_name], args.device
    gen = torch.Generator(device=device).manual_seed(0)
    backend, max_err = ("triton" if args.dry_run else "auto"), MAX_REL_ERR[dtype_name]
    base = {"dtype": dtype_name, "layer": name, "out_features": out_f, "in_features": in_f}
    xs = {n: torch.randn(n, in_f, device=device, dtype=dtype, generator=gen) for n in args.rows}
    cells, dense_ms = [], {}
    for n, x in xs.items():  # dense cuBLAS and 2:4 do not depend on the sparsity
        w = torch.randn(out_f, in_f, device=device, generator=gen).to(dtype)
        cell = measure({**base, "rows": n, "sparsity": None, "method": "dense"}, lambda x=x, w=w: F.linear(x, w),
                       F.linear(x, w), timer, None, max_err)
        dense_ms[n] = cell.get("ms")
        cells.append(cell)
        if "semi24" in args.baselines:
            w24 = two_four(w)
            cell = {**base, "rows": n, "sparsity": 0.5, "method": "semi24", "pattern": "2:4"}
            try:
                sparse24 = torch.sparse.to_sparse_semi_structured(w24)
                cell["kernel"] = "CUTLASS" if type(sparse24).__name__.endswith("CUTLASS") else "cuSPARSELt"
                measure(cell, lambda x=x, s=sparse24: F.linear(x, s), F.linear(x, w24), timer, dense_ms[n], max_err)
            except Exception as exc:  # noqa: BLE001
                cell["error"] = _error(exc)
            cells.append(cell)
    for sparsity in args.sparsities:
        dense = random_pruned(out_f, in_f, sparsity, dtype, gen, device)
        methods = {}
        for encoding in args.encodings:
            try:
                weight = TiledSparseWeight.from_dense(dense, args.block_n, encoding)
                methods[f"ours-{encoding}"] = (lambda x, w=weight: sparse_matmul(x, w, backend=backend), False,
                                               {"encoding": encoding, "sparse_bytes": weight.nbytes})
            except Exception as exc:  # noqa: BLE001
                methods[f"ours-{encoding}"] = exc
        for kind in ("csr", "bsr"):
            if kind in args.baselines:
                try:
                    sp = dense.to_sparse_csr() if kind == "csr" else dense.to_sparse_bsr(args.bsr_block)
                    methods[kind] = (lambda x, s=sp: torch.mm(s, x.t()), True, {})
                except Exception as exc:  # noqa: BLE001
                    methods[kind] = exc
        for n, x in xs.items():
            expected = F.linear(x, dense)
            for method, how in methods.items():
                cell = {**base, "rows": n, "sparsity": sparsity, "method": method}
                if isinstance(how, Exception):
                    cell["error"] = _error(how)
                else:
                    fn, transpose, extra = how
                    cell.update(extra)
                    measure(cell, lambda fn=fn, x=x: fn(x), expected, timer, dense_ms[n], max_err, transpose)
                cells.append(cell)
                if method.startswith("ours"):
                    ms = cell.get("ms", {}).get("p50")
                    print(f"{dtype_name:8s} {name:40s} N={n:<3d} {sparsity:.0%} {method:11s} "
                          + (f"{ms * 1e3:8.1f} us x{cell.get('speedup', float('nan')):.2f} err {cell['rel_err']:.1e}"
                             if ms is not None else cell.get("error", "")), file=sys.stderr, flush=True)
    return cells


def bench_convs(args, dtype_name: str, timer: Timer) -> list[dict]:
    """3x3 convs: dense cuDNN vs implicit-GEMM SpMM vs unfold + SpMM, one weight per (layer, sparsity)."""
    from kdexport.kernels.sparse_conv2d import conv_weight_matrix, sparse_conv2d
    from kdexport.kernels.sparse_format import TiledSparseWeight
    from kdexport.kernels.sparse_matmul import sparse_matmul

    dtype, device, backend = DTYPES[dtype_name], args.device, "triton" if args.dry_run else "auto"
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name, channels, size in (DRY["convs"] if args.dry_run else CONVS):
        for sparsity in args.conv_sparsities:
            dense = random_pruned(channels, channels * 9, sparsity, dtype, gen, device).view(channels, channels, 3, 3)
            implicit = TiledSparseWeight.from_dense(conv_weight_matrix(dense), args.block_n)
            unfolded = TiledSparseWeight.from_dense(dense.reshape(channels, -1), args.block_n)
            for batch in (DRY["conv_batches"] if args.dry_run else CONV_BATCHES):
                x = torch.randn(batch, channels, size, size, device=device, dtype=dtype, generator=gen)
                x = x.contiguous(memory_format=torch.channels_last)
                calls = {
                    "dense": lambda x=x, d=dense: F.conv2d(x, d, padding=1),
                    "implicit": lambda x=x, w=implicit: sparse_conv2d(x, w, kernel_size=(3, 3), padding=(1, 1),
                                                                      backend=backend),
                    "unfold": lambda x=x, w=unfolded: sparse_matmul(  # SparseConv2d's former path
                        F.unfold(x, 3, padding=1).transpose(1, 2), w, backend=backend)
                    .view(x.shape[0], *x.shape[2:], -1).permute(0, 3, 1, 2),
                }
                row = {"dtype": dtype_name, "layer": name, "channels": channels, "size": size, "batch": batch,
                       "sparsity": sparsity, "encoding": implicit.encoding, "ms": {}, "rel_err": {}, "errors": {},
                       "wrong": []}
                expected = calls["dense"]().float()
                for k, f in calls.items():
                    cell = measure({}, f, expected, timer, None, MAX_REL_ERR[dtype_name])
                    if "error" in cell:
                        row["errors"][k] = cell["error"]
                        continue
                    row["ms"][k], row["rel_err"][k] = cell["ms"], cell["rel_err"]
                    if cell["wrong"]:
                        row["wrong"].append(k)
                for k in ("implicit", "unfold"):
                    if k in row["ms"] and "dense" in row["ms"]:
                        row[f"{k}_speedup"] = row["ms"]["dense"]["p50"] / row["ms"][k]["p50"]
                rows.append(row)
                print(f"{dtype_name:8s} {name:28s} b={batch} {sparsity:.0%} "
                      + " ".join(f"{k} {q['p50'] * 1e3:.1f} us" for k, q in row["ms"].items()),
                      file=sys.stderr, flush=True)
    return rows


def bench_e2e(args, dtype_name: str, timer: Timer) -> dict:
    # lazy: torchvision imports triton (through torch._dynamo); only this part needs it
    import torchvision
    from torch.nn.utils import prune

    from kdexport.kernels import SparsifyConfig, sparsify_, sparsify_report

    torch.manual_seed(0)
    dense = torchvision.models.resnet18(num_classes=10)
    layers = [(m, "weight") for m in dense.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    prune.global_unstructured(layers, prune.L1Unstructured, amount=0.9)
    for m, name in layers:
        prune.remove(m, name)
    dtype = DTYPES[dtype_name]
    dense = dense.eval().to("cuda", dtype)
    x = torch.randn(1, 3, args.e2e_size, args.e2e_size, device="cuda", dtype=dtype)
    variants = {"dense": dense}
    for label, measured in (("sparsify_ (measured)", True), ("sparsify_ (all sparse)", False)):
        model = copy.deepcopy(dense)
        sparsify_(model, SparsifyConfig(batch_size=1, input_size=(3, args.e2e_size, args.e2e_size), measure=measured))
        variants[label] = model
    result = {"model": "resnet18 (torchvision), 10 classes, 90% global L1 weight pruning", "batch": 1,
              "dtype": dtype_name, "input_size": [3, args.e2e_size, args.e2e_size], "latency_ms": {},
              "layers_sparse": {}}
    with torch.no_grad():
        reference = dense(x).float()
        for label, model in variants.items():
            result["latency_ms"][label] = {"eager": timer(lambda m=model: m(x)),
                                           "cuda_graph": timer(lambda m=model: m(x), cuda_graph=True),
                                           "rel_err": rel_err(model(x), reference)}
            result["layers_sparse"][label] = sum(r["choice"] == "sparse" for r in sparsify_report(model))
    return result


def run(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """Measure what args ask for, rewriting args.out after every layer; returns the whole result."""
    from kdexport.checkpoint import write_json
    from kdexport.profile.environment import environment

    timer = Timer(args.device, args.warmup_ms, args.rep_ms)
    result = {"command": "python benchmarks/bench_spmm.py " + shlex.join(sys.argv[1:] if argv is None else argv),
              "note": "DRY RUN on CPU (Triton interpreter): timings are meaningless" if args.dry_run else None,
              "dtypes": args.dtypes, "block_n": args.block_n, "encodings": args.encodings, "timer": timer.name,
              "environment": environment(args.device), "layers": [], "convs": [], "e2e": None, "complete": False}

    def save() -> None:
        if args.out is not None:
            write_json(args.out, result)

    save()
    shapes = DRY["shapes"] if args.dry_run else SHAPES
    shapes = [s for s in shapes if args.shapes is None or any(f in s[0] for f in args.shapes)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(beta|prototype).*")  # torch.sparse's own notices
        for dtype_name in [] if args.no_layers else args.dtypes:
            for shape in shapes:
                result["layers"] += bench_layer(args, *shape, dtype_name, timer)
                save()
        for dtype_name in [] if args.no_conv else args.dtypes:
            result["convs"] += bench_convs(args, dtype_name, timer)
            save()
    if not args.no_e2e:
        result["e2e"] = bench_e2e(args, args.dtypes[0], timer)
    result["complete"] = True
    save()
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        print(render(json.loads(args.render.read_text())), end="")
        return 0
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton: the kernel runs interpreted
        args.device = "cpu"
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    else:
        args.device = "cuda"
    try:
        import triton  # noqa: F401
    except ImportError:
        print("needs triton (pip install triton)", file=sys.stderr)
        return 2
    result = run(args, argv)
    print(render(result), end="")
    bad = [c for c in result["layers"] if c["method"].startswith("ours") and (c.get("error") or c.get("wrong"))]
    bad += [c for c in result["convs"] if c["wrong"] or set(c["errors"]) - {"dense"}]
    if bad:
        print(f"{len(bad)} cells of our kernel failed or differ from dense (see the tables)", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
