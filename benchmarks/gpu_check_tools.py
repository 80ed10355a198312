"""The Python side of benchmarks/gpu_check.sh: what the wheel folder holds, what imports, the versions, the
results file, and the end-to-end table of `kdexport profile` torch vs torch-sparse.

    python benchmarks/gpu_check_tools.py wheels DIR          # each wheel, and whether it fits this python
    python benchmarks/gpu_check_tools.py imports             # exit 1 naming what steps 3-5 cannot import
    python benchmarks/gpu_check_tools.py versions TABLES_MD  # versions to stdout, one machine line to TABLES_MD
    python benchmarks/gpu_check_tools.py jsonl PART JSON OUT # append JSON as one line {"part": PART, ...} to OUT
    python benchmarks/gpu_check_tools.py profile-table --model M JSON...   # markdown, from `profile --json` files
Profile files are named profile-<sparsity>-<backend>.json (sparsity 0.00 is the unpruned student).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

IMPORTS = ("torch", "torchvision", "numpy", "scipy", "sklearn", "typer", "rich", "onnx", "onnxruntime", "PIL",
           "matplotlib", "pytest", "triton", "torch_pruning", "kdexport.cli", "kdexport.kernels.modules")
MACHINE_KEYS = ("gpu", "gpu_capability", "gpu_driver", "cuda_runtime", "cpu_model", "python")


def wheels(folder: Path) -> int:
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename
    except ImportError:  # pip vendors packaging
        from pip._vendor.packaging.tags import sys_tags
        from pip._vendor.packaging.utils import parse_wheel_filename
    supported = set(sys_tags())
    print(f"python {sys.version.split()[0]} at {sys.executable}; wheels in {folder}:")
    for wheel in sorted(folder.glob("*.whl")):
        tags = parse_wheel_filename(wheel.name)[3]
        fits = "fits this python" if tags & supported else "not for this python (pip leaves it)"
        print(f"  {wheel.name} ({wheel.stat().st_size // 1024} KiB): {fits}")
    return 0


def imports() -> int:
    missing = []
    for name in IMPORTS:
        try:
            module = importlib.import_module(name)
            print(f"{name:26s} {getattr(module, '__version__', ''):14s} {getattr(module, '__file__', '')}")
        except Exception as exc:  # noqa: BLE001 - any failure to import is what this reports
            missing.append(name)
            print(f"{name:26s} MISSING: {type(exc).__name__}: {exc}")
    if missing:
        print(f"cannot import: {', '.join(missing)}", file=sys.stderr)
    return 1 if missing else 0


def versions(tables: Path) -> int:
    import torch

    from kdexport.profile.environment import environment

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print("python", sys.version)
    sparselt = torch.backends.cusparselt.is_available() and torch.backends.cusparselt.version()
    print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
          "cusparselt", sparselt)
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", p.total_memory >> 20, "MiB")
    env = environment(device)
    print(json.dumps(env, indent=1, default=str))
    line = "; ".join([f"{k} {env[k]}" for k in MACHINE_KEYS if env.get(k)]
                     + [f"{k} {v}" for k, v in env.get("versions", {}).items() if v])
    with tables.open("a") as f:
        f.write(f"\nMachine: {line}; cuSPARSELt {sparselt or 'unavailable'}\n")
    return 0


def jsonl(part: str, source: Path, out: Path) -> int:
    record = {"part": part, **json.loads(source.read_text())}
    with out.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
    return 0


def profile_table(model: str, files: list[Path]) -> str:
    """torch vs torch-sparse p50/p90 per (sparsity, batch), the ratio from the same run of the script."""
    runs: dict[tuple[str, str], dict] = {}
    for path in files:
        _, sparsity, backend = path.stem.split("-", 2)
        try:
            runs[(sparsity, backend)] = json.loads(path.read_text())
        except ValueError:  # a refused, failed or cut-short run leaves its output empty or partial
            print(f"{path.name}: no complete result, left out", file=sys.stderr)
    if not runs:
        return "\n## End to end: no profile result\n"
    any_run = next(iter(runs.values()))
    lines = ["", f"## End to end: `kdexport profile`, {model} student, weight-pruned (global L1), "
             f"{any_run.get('device')}", "",
             f"Checkpoints made by the script: `kdexport train --model {model} --epochs 1` on digits (input "
             f"{'x'.join(map(str, any_run.get('input_size', [])))}), then `kdexport prune --method weight`. One epoch "
             "is enough: latency does not depend on accuracy. Median/p90 ms; speedup = torch p50 / torch-sparse "
             f"p50; warm-up {any_run.get('warmup')}, {any_run.get('iters')} timed queries per batch.", "",
             "| sparsity | batch | torch (dense) | torch-sparse | speedup | vs unpruned torch |",
             "|---:|---:|---:|---:|---:|---:|"]
    unpruned = {r["batch"]: r for r in runs.get(("0.00", "torch"), {}).get("results", [])}
    for sparsity in sorted({s for s, _ in runs}):
        dense = {r["batch"]: r for r in runs.get((sparsity, "torch"), {}).get("results", [])}
        sparse = {r["batch"]: r for r in runs.get((sparsity, "torch-sparse"), {}).get("results", [])}
        for batch in sorted(set(dense) | set(sparse)):
            d, s, u = dense.get(batch), sparse.get(batch), unpruned.get(batch)

            def ms(r):
                return f"{r['p50_ms']:.3f}/{r['p90_ms']:.3f}" if r else "not run"

            ratio = f"{d['p50_ms'] / s['p50_ms']:.2f}x" if d and s else ""
            best = s or d
            versus = f"{u['p50_ms'] / best['p50_ms']:.2f}x" if u and best and sparsity != "0.00" else ""
            lines.append(f"| {float(sparsity):.0%} | {batch} | {ms(d)} | {ms(s)} | {ratio} | {versus} |")
    if not any(backend == "torch-sparse" for _, backend in runs):
        lines.append("\ntorch-sparse: not run (see 5-profile.log; on a machine without a GPU it is refused, exit 2)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("wheels").add_argument("folder", type=Path)
    sub.add_parser("imports")
    sub.add_parser("versions").add_argument("tables", type=Path)
    j = sub.add_parser("jsonl")
    j.add_argument("part")
    j.add_argument("source", type=Path)
    j.add_argument("out", type=Path)
    t = sub.add_parser("profile-table")
    t.add_argument("--model", required=True)
    t.add_argument("files", type=Path, nargs="*")
    args = p.parse_args(argv)
    if args.command == "wheels":
        return wheels(args.folder)
    if args.command == "imports":
        return imports()
    if args.command == "versions":
        return versions(args.tables)
    if args.command == "jsonl":
        return jsonl(args.part, args.source, args.out)
    print(profile_table(args.model, args.files), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
