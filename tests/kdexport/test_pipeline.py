"""The compress pipeline: stages run once, are reused, refuse stale settings, and yield the per-method table."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kdexport.cli import app
from kdexport.errors import ConfigError
from kdexport.pipeline import RunConfig, summarise
from kdexport.vocab import parse_levels

runner = CliRunner()
FAST = ["--pair", "lenet5:lenet300_100", "--levels", "0,0.5", "--teacher-epochs", "1", "--distill-epochs", "1",
        "--finetune-epochs", "1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("compress") / "run"
    result = runner.invoke(app, ["compress", *FAST, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_compress_writes_every_stage_and_a_table(run_dir):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {"teacher", "student", "weight-0.50", "channel-0.50", "compress"} <= set(manifest["stages"])
    assert manifest["versions"]["torch"]
    results = json.loads((run_dir / "results.json").read_text())
    assert {(r["method"], r["level"]) for r in results["rows"]} == {
        ("weight", 0.0), ("weight", 0.5), ("channel", 0.0), ("channel", 0.5)}
    by = {(r["method"], r["level"]): r for r in results["rows"]}
    # weight pruning halves the non-zero parameters but keeps every tensor; channel pruning shrinks them
    assert by[("weight", 0.5)]["params_nonzero"] < 0.6 * by[("weight", 0.0)]["params_nonzero"]
    assert by[("weight", 0.5)]["macs"] == by[("weight", 0.0)]["macs"]
    assert by[("channel", 0.5)]["macs"] < by[("channel", 0.0)]["macs"]
    assert by[("weight", 0.0)]["deployed_params"] > by[("weight", 0.0)]["student_params"]  # projector + head
    assert any(r["breakpoint"] for r in results["table"]["weight"])


def test_rerun_reuses_finished_stages(run_dir):
    stamps = {p.name: p.stat().st_mtime_ns for p in run_dir.glob("*.pt")}
    result = runner.invoke(app, ["compress", *FAST, "--out", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.glob("*.pt")} == stamps
    payload = json.loads(result.stdout)
    assert len(payload["rows"]) == 4 and payload["summary"]


@pytest.mark.parametrize("changed, message", [
    (["--teacher-epochs", "2"], "teacher"),
    (["--finetune-lr", "0.02"], "weight-0.50"),  # the student is reused; its pruned levels are not
])
def test_changed_settings_are_refused_not_silently_mixed(run_dir, changed, message):
    stamps = {p.name: p.stat().st_mtime_ns for p in run_dir.glob("*.pt")}
    result = runner.invoke(app, ["compress", *FAST, *changed, "--out", str(run_dir)])
    assert result.exit_code == 2
    assert "--force" in result.output and message in result.output and "Traceback" not in result.output
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.glob("*.pt")} == stamps


@pytest.mark.parametrize("args, message", [
    (["--levels", "0,1.0"], "[0, 1)"),
    (["--levels", "a,b"], "--levels 'a,b'"),
    (["--methods", "magic"], "unknown method"),
    (["--pair", "nope-pair"], "unknown pair"),
    (["--finetune-lr", "0"], "--finetune-lr must be > 0"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = runner.invoke(app, ["compress", "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "r" / "teacher.pt").exists()


def test_parse_levels_ranges():
    assert parse_levels("0:0.9:0.1") == tuple(round(0.1 * i, 6) for i in range(10))
    assert parse_levels("0.5,0,0.3") == (0.0, 0.3, 0.5)
    with pytest.raises(ConfigError, match="duplicates"):  # one rule for compress and sweep: refused, not merged
        parse_levels("0.5,0,0.5")
    with pytest.raises(ConfigError):
        parse_levels("0:1:0.5")


def test_summarise_marks_breakpoint_and_recommends():
    cfg = RunConfig(pair="lenet5:lenet300_100", tolerance=1.0, profile="ort-cpu")
    rows = []
    curves = [("weight", [90, 89.5, 85], [1.0, 1.0, 1.0]), ("channel", [90, 89.2, 80], [1.0, 0.5, 0.3])]
    for method, accs, lat in curves:
        for level, acc, ms in zip([0.0, 0.5, 0.9], accs, lat, strict=True):
            rows.append({"method": method, "level": level, "top1": acc, "top5": 100.0,
                         "params_nonzero": 1e6 * (1 - level), "deployed_params": 2e6, "macs": 1e6,
                         "effective_macs": 1e6, "perf_efficiency": acc / (1 - level), "latency_b1_ms": ms,
                         "latency_bN_ms": ms * 8, "latency_efficiency": acc / ms})
    table, summary = summarise(rows, cfg)
    assert [r["breakpoint"] for r in table["weight"]] == [False, True, False]
    assert table["channel"][1]["speedup_b1"] == pytest.approx(2.0)
    assert summary[-1].startswith("ship: channel-pruned student at 50%")
