"""The compress pipeline: stages run once, are reused, refuse stale settings, and yield the per-method table."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kdexport import models
from kdexport.cli import app
from kdexport.errors import ConfigError
from kdexport.pipeline import RunConfig
from kdexport.summary import reference_lines, summarise
from kdexport.vocab import finetune_epochs, parse_levels

runner = CliRunner()
FAST = ["--pair", "lenet5:lenet300_100", "--levels", "0,0.5", "--teacher-epochs", "1", "--distill-epochs", "1",
        "--finetune-epochs", "1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("compress") / "run"
    result = runner.invoke(app, ["compress", *FAST, "--out", str(out), "--jobs", "2"])  # forked workers
    assert result.exit_code == 0, result.output
    assert "3 stages after the student, 2 at a time" in result.output
    return out


def test_compress_writes_every_stage_and_a_table(run_dir):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {"teacher", "baseline", "student", "weight-0.50", "channel-0.50", "compress"} <= set(manifest["stages"])
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
    # every row and both references carry the validation accuracy that choices use beside the test one
    assert all(0 <= r["val_top1"] <= 100 for r in results["rows"])
    for ref in ("teacher", "baseline"):
        assert {"val_top1", "test_top1", "deployed_params", "macs"} <= set(results[ref])
        assert results[ref]["test_top1"] == results[ref]["top1"]
    assert results["baseline"]["deployed_params"] < by[("weight", 0.0)]["deployed_params"]
    assert any(line.startswith("student lenet300_100 trained alone") for line in results["summary"])


def test_rerun_reuses_finished_stages(run_dir):
    stamps = {p.name: p.stat().st_mtime_ns for p in run_dir.glob("*.pt")}
    result = runner.invoke(app, ["compress", *FAST, "--out", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.glob("*.pt")} == stamps
    payload = json.loads(result.stdout)
    assert len(payload["rows"]) == 4 and payload["summary"]


def test_a_rerun_forks_workers_only_for_stages_still_to_make(run_dir, tmp_path, monkeypatch):
    """Finished stages are checked in the run's own process; only a missing one goes to run_side_by_side."""
    import shutil

    import kdexport.pipeline as pipeline

    sent = []
    real = pipeline.run_side_by_side
    monkeypatch.setattr(pipeline, "run_side_by_side", lambda calls, jobs, done: sent.append(len(calls)) or
                        real(calls, jobs, done))
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert runner.invoke(app, ["compress", *FAST, "--out", str(run), "--jobs", "2"]).exit_code == 0
    (run / "channel-0.50.pt").unlink()
    result = runner.invoke(app, ["compress", *FAST, "--out", str(run), "--jobs", "2"])
    assert result.exit_code == 0, result.output
    assert sent == [0, 1]
    assert "1 stage after the student, one at a time (2 already made)" in result.output


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


def test_a_weight_level_pruned_without_the_layer_floor_is_not_reused(run_dir, tmp_path):
    """Checkpoints from before the 2% layer floor (plain global L1) are refused, not mixed into a new table."""
    import shutil

    from kdexport.checkpoint import load_checkpoint, save_checkpoint

    old = tmp_path / "run"
    shutil.copytree(run_dir, old)
    state, spec = load_checkpoint(old / "weight-0.50.pt")
    del spec["prune"]["min_layer_density"]
    save_checkpoint(old / "weight-0.50.pt", state, spec)
    result = runner.invoke(app, ["compress", *FAST, "--out", str(old)])
    assert result.exit_code == 2 and "weight-0.50" in result.output and "min_layer_density" in result.output


def test_a_student_trained_on_the_partial_last_batch_is_not_reused(run_dir, tmp_path):
    """Stages from before the training loaders dropped their partial last batch (no `drop_last` in the recipe of
    their run identity) are refused with the field named, not silently reused."""
    import shutil

    from kdexport.checkpoint import load_checkpoint, save_checkpoint

    old = tmp_path / "run"
    shutil.copytree(run_dir, old)
    state, spec = load_checkpoint(old / "student.pt")
    assert spec["run"]["recipe"]["drop_last"] is True
    del spec["run"]["recipe"]["drop_last"]
    save_checkpoint(old / "student.pt", state, spec)
    result = runner.invoke(app, ["compress", *FAST, "--out", str(old)])
    assert result.exit_code == 2 and "student.pt" in result.output and "recipe.drop_last" in result.output


def test_a_level_recalibrated_on_other_batches_is_not_reused(run_dir, tmp_path):
    """Without fine-tuning a level still re-estimates BatchNorm on the recipe's loader (its batch size, its last
    batch), so the recipe is part of its identity at --finetune-epochs 0 too."""
    import shutil

    from kdexport.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    for level in run.glob("*-0.50.pt"):
        level.unlink()
    args = ["compress", *FAST, "--finetune-epochs", "0", "--out", str(run)]
    assert runner.invoke(app, args).exit_code == 0
    state, spec = load_checkpoint(run / "channel-0.50.pt")
    assert spec["prune"]["recipe"]["drop_last"] is True
    spec["prune"]["recipe"]["batch_size"] *= 2
    save_checkpoint(run / "channel-0.50.pt", state, spec)
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "channel-0.50" in result.output and "recipe.batch_size" in result.output


@pytest.mark.parametrize("args, message", [
    (["--levels", "0,1.0"], "[0, 1)"),
    (["--levels", "a,b"], "--levels 'a,b'"),
    (["--methods", "magic"], "unknown method"),
    (["--pair", "nope-pair"], "unknown pair"),
    (["--finetune-lr", "0"], "--finetune-lr must be > 0"),
    (["--val-fraction", "1.5"], "--val-fraction must be a fraction in (0, 1)"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--jobs", "0"], "--jobs must be a whole number >= 1"),
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


def _rows(curves, val_shift=0.0):
    rows = []
    for method, accs, lat in curves:
        for level, acc, ms in zip([0.0, 0.5, 0.9], accs, lat, strict=True):
            rows.append({"method": method, "level": level, "top1": acc, "val_top1": acc + val_shift, "top5": 100.0,
                         "params_nonzero": 1e6 * (1 - level), "deployed_params": 2e6 * (1 - level),
                         "deployed_dense": 2e6 * (1 - level if method == "channel" else 1), "macs": 1e6,
                         "effective_macs": 1e6, "perf_efficiency": acc / (1 - level), "latency_b1_ms": ms,
                         "latency_bN_ms": ms * 8, "latency_efficiency": acc / ms})
    return rows


CURVES = [("weight", [90, 89.5, 85], [1.0, 1.0, 1.0]), ("channel", [90, 89.2, 80], [1.0, 0.5, 0.3])]


def test_summarise_marks_breakpoint_and_recommends():
    table, summary = summarise(_rows(CURVES), 1.0, "tolerance", "ort-cpu")
    assert [r["breakpoint"] for r in table["weight"]] == [False, True, False]
    assert table["channel"][1]["speedup_b1"] == pytest.approx(2.0)
    assert summary[-1].startswith("ship: channel-pruned student at 50% (fastest on ort-cpu")


def test_without_latency_ship_ranks_by_the_deployed_file_and_says_weight_files_stay_dense():
    rows = [{k: v for k, v in r.items() if not k.startswith("latency")} for r in _rows(CURVES)]
    _, summary = summarise(rows, 1.0)
    assert summary[-1].startswith("ship: channel-pruned student at 50% (smallest deployed file")
    assert "stay dense" in summary[-1]


def test_a_distilled_student_below_the_student_trained_alone_is_flagged_on_validation():
    """Beyond the tolerance on val (test does not decide), with the teacher named when it, too, is below."""
    pair = models.resolve_pair("dens169-mobilenet")
    row = {"top1": 78.06, "val_top1": 78.70, "deployed_params": 2e7, "macs": 1e6}
    refs = {"teacher": {**row, "top1": 84.44, "val_top1": 86.11}, "baseline": {**row, "top1": 93.89, "val_top1": 94.44}}
    lines = reference_lines(refs, row, pair, tolerance=1.0)
    assert len(lines) == 3 and lines[2].startswith("warning: distillation lost 15.74 pt on val")
    assert "baseline.pt" in lines[2] and "--teacher-epochs" in lines[2]
    good_teacher = {**refs, "teacher": {**refs["teacher"], "val_top1": 99.0}}
    assert "--teacher-epochs" not in reference_lines(good_teacher, row, pair)[2]
    close = {**refs, "baseline": {**refs["baseline"], "top1": 10.0, "val_top1": 79.6}}  # 0.9 pt on val: within
    assert len(reference_lines(close, row, pair, tolerance=1.0)) == 2
    assert len(reference_lines(close, row, pair, tolerance=0.5)) == 3


def test_test_accuracy_never_feeds_a_choice():
    """Scrambling the test accuracies (as permuted test labels would) changes no choice; val decides."""
    rows = _rows(CURVES)
    scrambled = [{**r, "top1": 100.0 - r["top1"]} for r in rows]
    for backend in ("ort-cpu", None):
        strip = (lambda r: r) if backend else (lambda r: {k: v for k, v in r.items() if not k.startswith("lat")})
        (t1, s1), (t2, s2) = (summarise([strip(r) for r in rs], 1.0, "tolerance", backend) for rs in (rows, scrambled))
        assert [[r["breakpoint"] for r in t1[m]] for m in t1] == [[r["breakpoint"] for r in t2[m]] for m in t2]
        assert s1[-1].split(":")[1].split("(")[0] == s2[-1].split(":")[1].split("(")[0]


def test_decisions_know_their_noise():
    """Two repeats: a 1.5-point drop with spreads around 0.7 is inside the noise, so 50% stays within tolerance."""
    rows = []
    for seed, accs in enumerate(([95.0, 94.0, 80.0], [95.0, 93.0, 81.0])):
        for level, acc in zip([0.0, 0.5, 0.9], accs, strict=True):
            rows.append({"method": "channel", "level": level, "top1": acc, "val_top1": acc, "seed": seed,
                         "params_nonzero": 1.0, "deployed_params": 1.0, "deployed_dense": 1.0,
                         "perf_efficiency": 1.0})
    table, summary = summarise(rows, 1.0)
    assert table["channel"][1]["val_top1"] == 93.5 and table["channel"][1]["val_top1_sd"] == pytest.approx(0.7071, 1e-3)
    assert [r["breakpoint"] for r in table["channel"]] == [False, True, False]
    assert "93.50 ± 0.71" in summary[0] and "spread" in summary[0]
    single = [r for r in rows if r["seed"] == 0]  # one repeat: 1.0-point drop, exactly at the tolerance
    assert summarise(single, 0.9)[0]["channel"][0]["breakpoint"]


def test_fine_tuning_budget_per_method():
    assert (finetune_epochs("weight"), finetune_epochs("channel")) == (8, 20)  # from the recovery curves
    assert finetune_epochs("channel", 3) == 3 and finetune_epochs("weight", 0) == 0  # --finetune-epochs sets both
    assert RunConfig(pair="lenet5:lenet300_100").finetune_epochs is None
    with pytest.raises(ConfigError, match="--finetune-epochs"):
        RunConfig(pair="lenet5:lenet300_100", finetune_epochs=-1)
