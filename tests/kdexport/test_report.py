"""kdexport.report: every figure is a real PNG, the HTML embeds and names them all, notes for missing data."""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from test_sweep import FakeRunner, config  # noqa: E402

from kdexport.errors import DataError  # noqa: E402
from kdexport.report import build_report  # noqa: E402
from kdexport.sweep import run_sweep  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


class ProfilingRunner(FakeRunner):
    """FakeRunner rows plus latency columns, as a sweep with --profile writes them."""

    def cell(self, config, cell):
        row = super().cell(config, cell)
        ms = 1.0 if cell.method == "weight" else 1.0 - 0.6 * cell.level
        return {**row, "backend": "ort-cpu", "latency_b1_ms": ms, "latency_bN_ms": 8 * ms,
                "latency_efficiency": 0.5 * row["top1"] / (0.5 * ms)}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    cfg = config(tmp_path_factory.mktemp("report"), levels=(0.0, 0.2, 0.4, 0.6, 0.8), repeats=2)
    run_sweep(cfg, runner=ProfilingRunner())
    return cfg.out / "results.sqlite"


def check_figures(res: dict, out: Path, names: set[str]) -> str:
    page = (out / "index.html").read_text()
    assert {Path(f).name for f in res["figures"]} == names
    for f in res["figures"]:
        data = Path(f).read_bytes()
        assert data[:8] == PNG and len(data) > 5_000, f
        assert f'alt="{Path(f).name}"' in page and f'href="{Path(f).name}"' in page
        assert base64.b64encode(data).decode() in page  # embedded: the page stands alone
    assert len(re.findall(r'src="data:image/png;base64,', page)) == len(names)
    return page


def test_report_all_figures(store, tmp_path):
    out = tmp_path / "rep"
    res = build_report(store, out)
    page = check_figures(res, out, {"fig1_accuracy_vs_params.png", "fig3_efficiency.png",
                                    "fig5_layer_sparsity.png", "fig6_ttest.png", "fig7_latency.png"})
    assert res["notes"] == []
    assert "Paired t-test" in page and "Teachers and distilled students" in page and "lenet5:lenet300_100" in page


def test_report_without_latency_or_sparsity_notes_it(tmp_path):
    class Plain(FakeRunner):
        def cell(self, config, cell):
            return {k: v for k, v in super().cell(config, cell).items() if k != "layer_sparsity"}

    cfg = config(tmp_path, levels=(0.0, 0.5, 0.9), repeats=1)
    run_sweep(cfg, runner=Plain())
    res = build_report(cfg.out / "results.sqlite", tmp_path / "rep")
    page = check_figures(res, tmp_path / "rep", {"fig1_accuracy_vs_params.png", "fig3_efficiency.png",
                                                 "fig6_ttest.png"})
    assert "latency figure skipped" in page and "per-layer sparsity figure skipped" in page
    assert not (tmp_path / "rep" / "fig7_latency.png").exists()


def test_report_single_pair_skips_the_test_with_a_note(tmp_path):
    cfg = config(tmp_path, pairs=("resnet18:lenet5",), levels=(0.0, 0.5), repeats=1)
    run_sweep(cfg, runner=FakeRunner())
    res = build_report(cfg.out / "results.sqlite", tmp_path / "rep")
    assert any("needs >= 2 pairs" in n for n in res["notes"])
    check_figures(res, tmp_path / "rep", {"fig1_accuracy_vs_params.png", "fig5_layer_sparsity.png"})


def test_report_from_csv_and_cli(store, tmp_path):
    csv = tmp_path / "r.csv"
    lines = ["pair,method,accuracy,params,repeat,level"]
    for pair in ("a", "b", "c"):
        for method, drop in (("weight", 3), ("channel", 8)):
            for level in (0.0, 0.5, 0.9):
                lines.append(f"{pair},{method},{90 - drop * level**2:.2f},{int(4e6 * (1 - level))},0,{level}")
    csv.write_text("\n".join(lines) + "\n")
    res = build_report(csv, tmp_path / "csvrep")
    check_figures(res, tmp_path / "csvrep", {"fig1_accuracy_vs_params.png", "fig3_efficiency.png",
                                             "fig6_ttest.png"})
    from kdexport.cli import app

    cli = CliRunner().invoke(app, ["report", str(store), "--out", str(tmp_path / "clirep"), "--json"])
    assert cli.exit_code == 0, cli.output
    payload = json.loads(cli.stdout)
    assert Path(payload["html"]).is_file() and len(payload["figures"]) == 5
    bad = CliRunner().invoke(app, ["report", str(tmp_path / "missing.sqlite"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "not found" in bad.output
    with pytest.raises(DataError):
        build_report(tmp_path / "missing.sqlite", tmp_path / "x")
