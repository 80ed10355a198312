"""Triton SpMM (kernels.sparse_matmul) against dense cuBLAS on the weight shapes of the paper's students.

For each weight (out x in), sparsity and number of rows N of X, both Y = X @ W^T are timed in the same run
with triton.testing.do_bench (warm-up, L2 flushed before every call, median and p10/p90 of the calls);
the speedup is dense median / sparse median. Every cell is also checked against the dense result. Then the
3x3 convolutions of ResNet-18 at 224x224: dense cuDNN against the sparse kernel two ways, as an implicit GEMM
(kernels.sparse_conv2d, what SparseConv2d runs) and as F.unfold + SpMM (im2col in memory), same run. Then the
batch-1 latency of a 90% weight-pruned torchvision ResNet-18 (10 classes), dense vs sparsify_'d, eager and
replayed as a CUDA graph. Prints markdown tables; --out writes everything as JSON.

    python benchmarks/bench_spmm.py --out benchmarks/spmm.json            # fp16, all shapes
    python benchmarks/bench_spmm.py --rows 1 16 --sparsities 0.9 --e2e-size 224
Without a CUDA GPU it exits 2 ("needs a CUDA GPU").
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

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
ROWS = (1, 8, 16, 32)
TARGETS = {0.7: 1.4, 0.8: 1.7, 0.9: 2.1}  # speedup wanted for weight-heavy layers at N <= 16
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    p.add_argument("--sparsities", type=float, nargs="+", default=SPARSITIES)
    p.add_argument("--rows", type=int, nargs="+", default=ROWS, help="N, the rows of X (batch x pixels)")
    p.add_argument("--shapes", nargs="+", default=None, help="only shapes whose name contains one of these")
    p.add_argument("--block-n", type=int, default=64, help="rows per weight tile")
    p.add_argument("--encoding", choices=["auto", "bitmap", "index"], default="auto")
    p.add_argument("--e2e-size", type=int, default=32, help="ResNet-18 input height and width (e.g. 224)")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end ResNet-18 latency")
    p.add_argument("--no-conv", action="store_true", help="skip the implicit GEMM vs im2col convolutions")
    p.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    return p.parse_args(argv)


def quantiles_ms(fn, cuda_graph: bool = False) -> dict[str, float]:
    from triton.testing import do_bench, do_bench_cudagraph

    bench = do_bench_cudagraph if cuda_graph else do_bench
    p50, p10, p90 = bench(fn, quantiles=[0.5, 0.1, 0.9])
    return {"p50": p50, "p10": p10, "p90": p90}


def random_pruned(out_f: int, in_f: int, sparsity: float, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Unstructured L1 pruning of a random weight: the smallest |w| are zeroed, as prune.l1_unstructured does."""
    w = torch.randn(out_f, in_f, device="cuda", generator=gen)
    k = round(sparsity * w.numel())
    if k:
        w.view(-1)[w.abs().view(-1).topk(k, largest=False).indices] = 0
    return w.to(dtype)


def bench_layers(args: argparse.Namespace) -> list[dict]:
    from kdexport.kernels.sparse_format import TiledSparseWeight
    from kdexport.kernels.sparse_matmul import sparse_matmul

    dtype, gen = DTYPES[args.dtype], torch.Generator(device="cuda").manual_seed(0)
    shapes = [s for s in SHAPES if args.shapes is None or any(f in s[0] for f in args.shapes)]
    rows = []
    for name, out_f, in_f in shapes:
        for sparsity in args.sparsities:
            dense = random_pruned(out_f, in_f, sparsity, dtype, gen)
            weight = TiledSparseWeight.from_dense(dense, args.block_n, args.encoding)
            for n in args.rows:
                x = torch.randn(n, in_f, device="cuda", dtype=dtype, generator=gen)
                expected, got = torch.nn.functional.linear(x, dense), sparse_matmul(x, weight)
                rel_err = ((got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()
                dense_ms = quantiles_ms(lambda x=x, d=dense: torch.nn.functional.linear(x, d))
                sparse_ms = quantiles_ms(lambda x=x, w=weight: sparse_matmul(x, w))
                rows.append({"layer": name, "out_features": out_f, "in_features": in_f, "rows": n,
                             "sparsity": sparsity, "encoding": weight.encoding, "sparse_bytes": weight.nbytes,
                             "dense_bytes": dense.numel() * dense.element_size(), "rel_err": rel_err,
                             "dense_ms": dense_ms, "sparse_ms": sparse_ms,
                             "speedup": dense_ms["p50"] / sparse_ms["p50"]})
                print(f"{name:40s} N={n:<3d} {sparsity:.0%} {weight.encoding:6s} "
                      f"dense {dense_ms['p50'] * 1e3:8.1f} us  sparse {sparse_ms['p50'] * 1e3:8.1f} us  "
                      f"x{rows[-1]['speedup']:.2f}  err {rel_err:.1e}", file=sys.stderr, flush=True)
                if not rel_err < 1e-2:
                    raise SystemExit(f"sparse result differs from dense for {name} N={n} at {sparsity:.0%}: "
                                     f"relative error {rel_err:.2e}")
    return rows


def bench_convs(args: argparse.Namespace) -> list[dict]:
    """3x3 convs: dense cuDNN vs implicit-GEMM SpMM vs unfold + SpMM, one weight per (layer, sparsity)."""
    import torch.nn.functional as F

    from kdexport.kernels.sparse_conv2d import conv_weight_matrix, sparse_conv2d
    from kdexport.kernels.sparse_format import TiledSparseWeight
    from kdexport.kernels.sparse_matmul import sparse_matmul

    dtype, gen = DTYPES[args.dtype], torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, channels, size in CONVS:
        for sparsity in args.sparsities:
            dense = random_pruned(channels, channels * 9, sparsity, dtype, gen).view(channels, channels, 3, 3)
            implicit = TiledSparseWeight.from_dense(conv_weight_matrix(dense), args.block_n, args.encoding)
            unfolded = TiledSparseWeight.from_dense(dense.reshape(channels, -1), args.block_n, args.encoding)
            for batch in CONV_BATCHES:
                x = torch.randn(batch, channels, size, size, device="cuda", dtype=dtype, generator=gen)
                x = x.contiguous(memory_format=torch.channels_last)
                calls = {
                    "dense": lambda x=x, d=dense: F.conv2d(x, d, padding=1),
                    "implicit": lambda x=x, w=implicit: sparse_conv2d(x, w, kernel_size=(3, 3), padding=(1, 1)),
                    "unfold": lambda x=x, w=unfolded: sparse_matmul(  # SparseConv2d's former path
                        F.unfold(x, 3, padding=1).transpose(1, 2), w).view(x.shape[0], *x.shape[2:], -1)
                    .permute(0, 3, 1, 2),
                }
                expected = calls["dense"]().float()
                errors = {k: ((f().float() - expected).norm() / expected.norm()).item() for k, f in calls.items()}
                if not max(errors.values()) < 1e-2:
                    raise SystemExit(f"sparse conv differs from dense for {name} batch {batch} at {sparsity:.0%}: "
                                     f"{errors}")
                ms = {k: quantiles_ms(f) for k, f in calls.items()}
                rows.append({"layer": name, "channels": channels, "size": size, "batch": batch,
                             "sparsity": sparsity, "ms": ms, "rel_err": errors,
                             "implicit_speedup": ms["dense"]["p50"] / ms["implicit"]["p50"],
                             "unfold_speedup": ms["dense"]["p50"] / ms["unfold"]["p50"]})
                print(f"{name:28s} b={batch} {sparsity:.0%} dense {ms['dense']['p50'] * 1e3:8.1f} us  implicit "
                      f"{ms['implicit']['p50'] * 1e3:8.1f} us  unfold {ms['unfold']['p50'] * 1e3:8.1f} us",
                      file=sys.stderr, flush=True)
    return rows


def conv_markdown(rows: list[dict]) -> str:
    lines = ["| layer | batch | sparsity | dense cuDNN us | implicit GEMM us (speedup) | unfold + SpMM us (speedup) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms = {k: v["p50"] * 1e3 for k, v in r["ms"].items()}
        lines.append(f"| {r['layer']} ({r['size']}x{r['size']}) | {r['batch']} | {r['sparsity']:.0%} | "
                     f"{ms['dense']:.1f} | {ms['implicit']:.1f} ({r['implicit_speedup']:.2f}x) | "
                     f"{ms['unfold']:.1f} ({r['unfold_speedup']:.2f}x) |")
    return "\n".join(lines)


def bench_e2e(args: argparse.Namespace) -> dict:
    import torchvision
    from torch.nn.utils import prune

    from kdexport.kernels import SparsifyConfig, sparsify_, sparsify_report

    torch.manual_seed(0)
    dense = torchvision.models.resnet18(num_classes=10)
    layers = [(m, "weight") for m in dense.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    prune.global_unstructured(layers, prune.L1Unstructured, amount=0.9)
    for m, name in layers:
        prune.remove(m, name)
    dense = dense.eval().to("cuda", DTYPES[args.dtype])
    x = torch.randn(1, 3, args.e2e_size, args.e2e_size, device="cuda", dtype=DTYPES[args.dtype])
    variants = {"dense": dense}
    for label, measure in (("sparsify_ (measured)", True), ("sparsify_ (all sparse)", False)):
        model = copy.deepcopy(dense)
        sparsify_(model, SparsifyConfig(batch_size=1, input_size=(3, args.e2e_size, args.e2e_size), measure=measure))
        variants[label] = model
    result = {"model": "resnet18 (torchvision), 10 classes, 90% global L1 weight pruning", "batch": 1,
              "input_size": [3, args.e2e_size, args.e2e_size], "latency_ms": {}, "layers_sparse": {}}
    with torch.no_grad():
        reference = dense(x).float()
        for label, model in variants.items():
            err = ((model(x).float() - reference).norm() / reference.norm()).item()
            result["latency_ms"][label] = {"eager": quantiles_ms(lambda m=model: m(x)),
                                           "cuda_graph": quantiles_ms(lambda m=model: m(x), cuda_graph=True),
                                           "rel_err": err}
            result["layers_sparse"][label] = sum(r["choice"] == "sparse" for r in sparsify_report(model))
    return result


def markdown(rows: list[dict], e2e: dict | None) -> str:
    sparsities = sorted({r["sparsity"] for r in rows})
    lines = ["| layer | W (out x in) | N | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
             "|---|---|---|" + "---|" * len(sparsities)]
    cells = {(r["layer"], r["rows"], r["sparsity"]): r for r in rows}
    for name, out_f, in_f in dict.fromkeys((r["layer"], r["out_features"], r["in_features"]) for r in rows):
        for n in sorted({r["rows"] for r in rows}):
            speedups = [cells.get((name, n, s)) for s in sparsities]
            lines.append(f"| {name} | {out_f}x{in_f} | {n} | "
                         + " | ".join(f"{c['speedup']:.2f}x" if c else "" for c in speedups) + " |")
    lines.append("\nSpeedup = dense cuBLAS median / Triton SpMM median (do_bench, L2 flushed).")
    heavy = [r for r in rows if "head" not in r["layer"] and r["rows"] <= 16]
    for sparsity, target in TARGETS.items():
        got = [r["speedup"] for r in heavy if r["sparsity"] == sparsity]
        if got:
            lines.append(f"- {sparsity:.0%}, weight-heavy layers, N <= 16: median {statistics.median(got):.2f}x, "
                         f"min {min(got):.2f}x (target {target}x)")
    if e2e:
        lines += ["", f"ResNet-18, batch 1, {e2e['input_size'][1]}x{e2e['input_size'][2]}, "
                      "90% weight-pruned: median latency (ms)", "",
                  "| model | layers sparse | eager | CUDA graph | rel. error |", "|---|---|---|---|---|"]
        for label, t in e2e["latency_ms"].items():
            lines.append(f"| {label} | {e2e['layers_sparse'][label]} | {t['eager']['p50']:.3f} | "
                         f"{t['cuda_graph']['p50']:.3f} | {t['rel_err']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("needs triton (pip install triton)", file=sys.stderr)
        return 2
    from kdexport.checkpoint import write_json
    from kdexport.profile.environment import environment

    rows = bench_layers(args)
    convs = [] if args.no_conv else bench_convs(args)
    e2e = None if args.no_e2e else bench_e2e(args)
    print(markdown(rows, e2e))
    if convs:
        print("\n" + conv_markdown(convs))
    if args.out is not None:
        write_json(args.out, {"command": shlex.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
                              "dtype": args.dtype, "block_n": args.block_n, "encoding": args.encoding,
                              "environment": environment("cuda"), "layers": rows, "convs": convs, "e2e": e2e})
    return 0


if __name__ == "__main__":
    sys.exit(main())
