"""INT8 you can trust (issue 15): the INT8 table over student checkpoints, and OpenVINO vs ONNX Runtime latency.

    python benchmarks/bench_int8.py accuracy CKPT... [--json FILE]
        For each checkpoint and each recipe (tensorrt, cpu): `kdexport.export.export(..., int8=True)` with the
        defaults (auto calibration search, --max-drop 1.0, 128 calibration images from train, all validation
        images); prints one markdown row: fp32 vs INT8 validation top-1 with the runtime that measured it (and
        ONNX Runtime's figure for the tensorrt recipe), the test top-1 measured once, the chosen calibration, the
        fp32-kept nodes, or the refusal and its reason.
    python benchmarks/bench_int8.py latency CKPT... [--batch 1,32] [--rounds 5] [--threads 1]
        fp32 ONNX (dynamic batch) of each checkpoint under ort-cpu and openvino (CPU), interleaved round by
        round so that load bursts hit both; each round is `kdexport profile`'s single-stream method (warm-up,
        then timed queries). Prints p50/p90/p99 of the median round and the ORT/OpenVINO p50 ratio per round
        (median and range): a ratio measured in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from kdexport.checkpoint import load_checkpoint
from kdexport.export import ExportConfig, export, export_onnx
from kdexport.export.formats import Int8DropError
from kdexport.profile import ProfileConfig, profile


def describe(ckpt: Path) -> str:
    _, spec = load_checkpoint(ckpt)
    prune = spec.get("prune") or {}
    name = spec.get("student") or spec.get("model")
    kind = "distilled" if spec.get("kind") == "distilled" else "trained"
    level = f", {prune['method']} {prune['amount']:.0%}" if prune.get("amount") else ""
    return f"{name} ({kind}{level})"


def accuracy_rows(ckpts: list[Path]) -> list[dict]:
    rows = []
    print("| student | recipe | fp32 val (ORT) | INT8 val (runtime) | other runtime | test fp32 → INT8 | "
          "calibration (runs / trials) | fp32-kept nodes | result | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for ckpt in ckpts:
        for recipe in ("tensorrt", "cpu"):
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    r = export(ckpt, ExportConfig(int8=True, int8_target=recipe, out=Path(tmp, "m.onnx")))
                except Int8DropError as exc:
                    row = {"checkpoint": str(ckpt), "recipe": recipe, "refused": str(exc)}
                    print(f"| {describe(ckpt)} | {recipe} | | | | | | | refused: {str(exc).split('; nothing')[0]} "
                          f"| {time.perf_counter() - start:.0f} |", flush=True)
                    rows.append(row)
                    continue
            seconds = time.perf_counter() - start
            cal = r.calibration
            other = {k: v for k, v in r.int8_accuracies.items() if k != r.int8_runtime}
            rows.append({"checkpoint": str(ckpt), "recipe": recipe, **r.to_dict(), "seconds": seconds})
            print(f"| {describe(ckpt)} | {recipe} | {r.accuracy_fp32:.2f} | {r.accuracy_int8:.2f} "
                  f"({r.int8_runtime}) | {'; '.join(f'{v:.2f} ({k})' for k, v in other.items()) or '—'} | "
                  f"{r.test_accuracy_fp32:.2f} → {r.test_accuracy_int8:.2f} | {cal['method']} "
                  f"({cal['calibration_runs']} / {len(cal['trials'])}) | "
                  f"{', '.join(cal['fp32_nodes']) or 'none'} | within {r.max_drop:g} "
                  f"({r.accuracy_delta:+.2f}) | {seconds:.0f} |", flush=True)
    return rows


def latency_rows(ckpts: list[Path], batches: tuple[int, ...], rounds: int, threads: int) -> list[dict]:
    rows = []
    print("| student | batch | ort-cpu p50 / p90 / p99 ms | openvino p50 / p90 / p99 ms | ORT / OpenVINO p50, "
          "median (range) |")
    print("|---|---|---|---|---|")
    for ckpt in ckpts:
        with tempfile.TemporaryDirectory() as tmp:
            onnx = export_onnx(ckpt, Path(tmp, "m.onnx"))
            runs: dict[str, list] = {"ort-cpu": [], "openvino": []}
            for _ in range(rounds):
                for backend in runs:
                    cfg = ProfileConfig(backend, batch_sizes=batches, warmup=10, iters=50, threads=threads)
                    runs[backend].append(profile(onnx, cfg))
        for i, batch in enumerate(batches):
            ratios = [o.results[i].p50_ms / v.results[i].p50_ms for o, v in zip(runs["ort-cpu"], runs["openvino"],
                                                                                 strict=True)]
            cells = []
            for backend in runs:
                ordered = sorted(runs[backend], key=lambda r: r.results[i].p50_ms)
                mid = ordered[len(ordered) // 2].results[i]
                cells.append(f"{mid.p50_ms:.3f} / {mid.p90_ms:.3f} / {mid.p99_ms:.3f}")
            rows.append({"checkpoint": str(ckpt), "batch": batch, "ratios": ratios})
            print(f"| {describe(ckpt)} | {batch} | {cells[0]} | {cells[1]} | {statistics.median(ratios):.2f} "
                  f"({min(ratios):.2f}–{max(ratios):.2f}) |", flush=True)
    env = runs["openvino"][0].environment
    print(f"\nthreads {threads}, {rounds} rounds x (10 warm-up + 50 timed queries) per backend; "
          f"{env['cpu_model']}; versions {json.dumps(env['versions'])}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("accuracy", "latency"))
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--batch", default="1,32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.what == "accuracy":
        rows = accuracy_rows(args.checkpoints)
    else:
        rows = latency_rows(args.checkpoints, tuple(int(b) for b in args.batch.split(",")), args.rounds,
                            args.threads)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
