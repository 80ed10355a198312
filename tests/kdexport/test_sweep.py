"""kdexport.sweep: the results store, resuming after a crash, local and Ray executors, the real pipeline."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdexport import models
from kdexport.errors import ConfigError
from kdexport.sweep import (
    ResultsStore,
    SweepConfig,
    SweepFailed,
    parse_levels,
    parse_methods,
    parse_pairs,
    run_sweep,
    stats_rows,
)

ROOT = Path(__file__).resolve().parents[2]


class FakeRunner:
    """Deterministic rows without training; `fail` names cells (method, level, repeat) that raise."""

    def __init__(self, fail=(), sleep: float = 0.0):
        self.fail, self.sleep = set(fail), sleep

    def stage(self, config, pair, repeat):
        return {"top1": 99.0 if repeat is None else 95.0, "top5": 100.0, "params": 1_000_000,
                "model": pair.split(":")[0 if repeat is None else 1]}

    def cell(self, config, cell):
        time.sleep(self.sleep)
        if (cell.method, cell.level, cell.repeat) in self.fail:
            raise RuntimeError(f"boom at {cell.level}")
        keep = 1 - cell.level
        top1 = 95.0 - (30 * cell.level**3 if cell.method == "weight" else 20 * cell.level**2) - cell.repeat * 0.1
        params = int(1_000_000 * keep)
        return {"top1": top1, "top5": 100.0, "params_nonzero": params, "student_params": 1_000_000,
                "deployed_params": params + 500_000, "macs": 10_000, "effective_macs": int(10_000 * keep),
                "perf_efficiency": 0.5 * top1 / (0.5 * params / 1e6),
                "layer_sparsity": [{"layer": f"l{i}", "kind": "conv", "params": 100, "nonzero": 100 - i * 10,
                                    "sparsity": i / 10} for i in range(3)],
                "note": "kept in extra"}


def config(tmp_path, **kw) -> SweepConfig:
    base = dict(pairs=("lenet5:lenet300_100", "resnet18:lenet5"), levels=(0.0, 0.5), out=tmp_path / "study",
                repeats=2, teacher_epochs=1, distill_epochs=1, finetune_epochs=1)
    return SweepConfig(**{**base, **kw})


def db_keys(path: Path) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT pair, dataset, method, level, repeat FROM results").fetchall()
    except sqlite3.OperationalError:  # the store is being created
        return []
    finally:
        db.close()


# --------------------------------------------------------------------------------------------- parsing
def test_parse_levels_range_and_list():
    assert parse_levels("0:0.9:0.1") == tuple(round(0.1 * i, 6) for i in range(10))
    assert parse_levels("0.5, 0,0.9") == (0.0, 0.5, 0.9)
    for bad in ("0:1:0.5", "a,b", "0:0.5:0", "0.2,0.2", "", "1.0"):
        with pytest.raises(ConfigError):
            parse_levels(bad)


def test_parse_pairs_and_methods():
    assert parse_pairs("res101-res18, resnet18:lenet5") == ("res101-res18", "resnet18:lenet5")
    assert len(parse_pairs("all")) >= 10
    assert parse_methods("channel,weight,channel") == ("channel", "weight")
    with pytest.raises(models.ModelError, match="unknown"):
        parse_pairs("nope")
    with pytest.raises(ConfigError):
        parse_methods("weights")
    with pytest.raises(ConfigError, match="repeats"):
        config(Path("/tmp"), repeats=0)


# ---------------------------------------------------------------------------------------------- store
def test_store_primary_key_and_json_columns(tmp_path):
    with ResultsStore(tmp_path / "r.sqlite") as store:
        row = {"pair": "a", "dataset": "digits", "method": "weight", "level": 0.1 * 3, "repeat": 0, "top1": 90.0,
               "layer_sparsity": [{"layer": "x", "sparsity": 0.5}], "custom": 7}
        assert store.write(row) is True
        assert store.write({**row, "level": 0.3, "top1": 10.0}) is False  # same cell: ignored, not duplicated
        (got,) = store.rows()
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # while the sweep writes
    assert got["level"] == 0.3 and got["top1"] == 90.0 and got["custom"] == 7
    assert got["layer_sparsity"] == [{"layer": "x", "sparsity": 0.5}]
    # closed, it is one plain file: a reader (stats, report, a committed copy) leaves no -wal/-shm beside it
    with ResultsStore(tmp_path / "r.sqlite", create=False) as reader:
        assert len(reader.rows()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.sqlite"]
    with sqlite3.connect(tmp_path / "r.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        with pytest.raises(sqlite3.IntegrityError):
            db.execute("INSERT INTO results (pair, dataset, method, level, repeat) VALUES ('a','digits','weight',"
                       "0.3,0)")


def test_store_rejects_foreign_file(tmp_path):
    bad = tmp_path / "x.sqlite"
    bad.write_bytes(b"not a database at all" * 100)
    with pytest.raises(Exception, match="not a kdexport results store"):
        ResultsStore(bad)


# ------------------------------------------------------------------------------------------- local runs
def test_local_sweep_then_rerun_skips_everything(tmp_path):
    cfg = config(tmp_path)
    logs: list[str] = []
    summary = run_sweep(cfg, runner=FakeRunner(), log=logs.append)
    assert summary["cells"] == summary["ran"] == 2 * 2 * 2 * 2 and summary["remaining"] == 0
    assert "16 cells: 0 already done, 16 remaining" in logs[0]
    rows, stages = ResultsStore(cfg.out / "results.sqlite").rows(), ResultsStore(cfg.out / "results.sqlite").stages()
    assert len(rows) == 16 and {r["seed"] for r in rows} == {0, 1}
    assert all(r["host"] and r["torch_version"] and r["kdexport_version"] and r["duration_s"] >= 0 for r in rows)
    assert rows[0]["note"] == "kept in extra" and len(rows[0]["layer_sparsity"]) == 3
    assert sorted((s["pair"], s["stage"], s["repeat"]) for s in stages) == sorted(
        [(p, "teacher", -1) for p in cfg.pairs] + [(p, "student", r) for p in cfg.pairs for r in (0, 1)])
    logs.clear()
    again = run_sweep(cfg, runner=FakeRunner(fail={("weight", 0.5, 0)}), log=logs.append)  # nothing runs
    assert again["ran"] == 0 and again["skipped"] == 16 and "16 already done, 0 remaining" in logs[0]
    # extending the levels runs only the new cells
    more = run_sweep(config(tmp_path, levels=(0.0, 0.5, 0.9)), runner=FakeRunner())
    assert more["ran"] == 8 and more["skipped"] == 16
    assert len(db_keys(cfg.out / "results.sqlite")) == len(set(db_keys(cfg.out / "results.sqlite"))) == 24


def test_failed_cells_are_reported_and_retried(tmp_path):
    cfg = config(tmp_path, pairs=("resnet18:lenet5",), repeats=1)
    logs: list[str] = []
    with pytest.raises(SweepFailed, match=r"1 of 4 cells failed .*boom at 0.5.*1 remaining"):
        run_sweep(cfg, runner=FakeRunner(fail={("channel", 0.5, 0)}), log=logs.append)
    assert len(db_keys(cfg.out / "results.sqlite")) == 3
    assert any("failed: resnet18:lenet5 channel 0.50" in m for m in logs)
    summary = run_sweep(cfg, runner=FakeRunner())
    assert (summary["ran"], summary["skipped"], summary["remaining"]) == (1, 3, 0)


def test_other_settings_are_refused(tmp_path):
    run_sweep(config(tmp_path, repeats=1), runner=FakeRunner())
    with pytest.raises(ConfigError, match="finetune_epochs"):
        run_sweep(config(tmp_path, repeats=1, finetune_epochs=3), runner=FakeRunner())


def test_sigkill_mid_sweep_loses_only_cells_in_flight(tmp_path):
    """A sweep killed with SIGKILL after its first rows resumes: no duplicates, the rest run, counts reported."""
    out = tmp_path / "study"
    script = textwrap.dedent(f"""
        import sys; sys.path[:0] = [{str(ROOT)!r}, {str(Path(__file__).parent)!r}]
        from pathlib import Path
        from test_sweep import FakeRunner
        from kdexport.sweep import SweepConfig, run_sweep
        cfg = SweepConfig(pairs=("lenet5:lenet300_100", "resnet18:lenet5"), levels=(0.0, 0.5), repeats=2,
                          out=Path({str(out)!r}), teacher_epochs=1, distill_epochs=1, finetune_epochs=1)
        run_sweep(cfg, runner=FakeRunner(sleep=0.4))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    store = out / "results.sqlite"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if store.is_file() and len(db_keys(store)) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(db_keys(store))
    assert 3 <= before < 16
    logs: list[str] = []
    summary = run_sweep(config(tmp_path), runner=FakeRunner(), log=logs.append)
    assert f"16 cells: {before} already done, {16 - before} remaining" in logs[0]
    assert (summary["skipped"], summary["ran"], summary["remaining"]) == (before, 16 - before, 0)
    keys = db_keys(store)
    assert len(keys) == len(set(keys)) == 16


def test_ray_missing_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'kdexport\[distributed\]'"):
        run_sweep(config(tmp_path), "ray", runner=FakeRunner())
    from kdexport.cli import app

    res = CliRunner().invoke(app, ["sweep", "--pairs", "resnet18:lenet5", "--out", str(tmp_path / "s"),
                                   "--levels", "0", "--executor", "ray"])
    assert res.exit_code == 2 and "kdexport[distributed]" in res.output


# ------------------------------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="Ray (the distributed extra) is not installed")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need FakeRunner's code
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()


def test_ray_sweep_matches_local(tmp_path, ray_local):
    local = run_sweep(config(tmp_path / "a"), runner=FakeRunner())
    with pytest.raises(SweepFailed, match="2 of 16"):  # (weight, 0.5, repeat 1) of both pairs
        run_sweep(config(tmp_path / "b"), "ray", runner=FakeRunner(fail={("weight", 0.5, 1)}))
    summary = run_sweep(config(tmp_path / "b"), "ray", runner=FakeRunner())
    assert (summary["ran"], summary["skipped"], local["ran"]) == (2, 14, 16)
    a = ResultsStore(tmp_path / "a" / "study" / "results.sqlite").rows()
    b = ResultsStore(tmp_path / "b" / "study" / "results.sqlite").rows()
    strip = ("duration_s", "finished_at", "host")
    assert [{k: v for k, v in r.items() if k not in strip} for r in a] == \
        [{k: v for k, v in r.items() if k not in strip} for r in b]
    assert ray_local.is_initialized()  # the sweep leaves a Ray instance it did not start alone


# --------------------------------------------------------------------------------------- stats reading
def test_stats_rows_from_store_and_cli(tmp_path):
    cfg = config(tmp_path, levels=(0.0, 0.3, 0.6, 0.9))
    run_sweep(cfg, runner=FakeRunner())
    rows = stats_rows(cfg.out / "results.sqlite")
    assert len(rows) == 32 and set(rows[0]) == {"pair", "method", "accuracy", "params", "repeat", "level"}
    assert {r["params"] for r in stats_rows(cfg.out / "results.sqlite", "deployed")} >= {1_500_000}
    from kdexport.cli import app

    res = CliRunner().invoke(app, ["stats", str(cfg.out / "results.sqlite"), "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert {"t", "p", "df", "n_pairs"} <= set(payload) and payload["n_pairs"] == 2 and payload["df"] == 1
    table = CliRunner().invoke(app, ["stats", str(cfg.out / "results.sqlite"), "--tolerance", "2"])
    assert table.exit_code == 0 and "paired t-test" in table.stdout
    csv = tmp_path / "r.csv"
    csv.write_text("pair,method,accuracy,params\na,weight,90,1000000\na,channel,91,900000\n"
                   "b,weight,80,1000000\nb,channel,85,800000\nc,weight,70,2000000\nc,channel,72,1000000\n")
    res = CliRunner().invoke(app, ["stats", str(csv), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["n_pairs"] == 3
    missing = CliRunner().invoke(app, ["stats", str(tmp_path / "none.sqlite")])
    assert missing.exit_code == 2 and "not found" in missing.output


# ------------------------------------------------------------------------------------ the real pipeline
def test_real_sweep_cli_local_then_resume(tmp_path):
    """The real pipeline on the tiniest config, through the CLI; a rerun with more levels resumes."""
    from kdexport.cli import app

    out = tmp_path / "study"
    args = ["sweep", "--pairs", "lenet5:lenet300_100", "--out", str(out), "--methods", "weight,channel",
            "--repeats", "1", "--teacher-epochs", "1", "--distill-epochs", "1", "--finetune-epochs", "1",
            "--device", "cpu", "--json"]
    first = CliRunner().invoke(app, [*args, "--levels", "0"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["ran"] == 2
    second = CliRunner().invoke(app, [*args, "--levels", "0,0.5"])
    assert second.exit_code == 0, second.output
    assert "4 cells: 2 already done, 2 remaining" in second.stderr
    rows = ResultsStore(out / "results.sqlite").rows()
    assert len(rows) == 4
    by = {(r["method"], r["level"]): r for r in rows}
    assert by[("weight", 0.5)]["params_nonzero"] < 0.6 * by[("weight", 0.0)]["params_nonzero"]
    assert by[("channel", 0.5)]["student_params"] < by[("channel", 0.0)]["student_params"]
    for r in rows:
        assert 0 <= r["top1"] <= 100 and r["macs"] > 0 and r["versions"]["torch"]
        assert r["layer_sparsity"] and all(0 <= lay["sparsity"] <= 1 for lay in r["layer_sparsity"])
    chan = by[("channel", 0.5)]["layer_sparsity"]
    assert sum(lay["params"] - lay["nonzero"] for lay in chan) > 0  # removed relative to the unpruned arch
    assert (out / "digits" / "lenet5-lenet300_100" / "teacher.pt").is_file()


def test_real_sweep_on_ray(tmp_path, ray_local):
    cfg = SweepConfig(pairs=("lenet5:lenet300_100",), levels=(0.0, 0.5), out=tmp_path / "study", repeats=2,
                      methods=("weight",), teacher_epochs=1, distill_epochs=1, finetune_epochs=1, device="cpu")
    summary = run_sweep(cfg, "ray")
    assert summary["ran"] == 4 and summary["remaining"] == 0
    stages = ResultsStore(cfg.out / "results.sqlite").stages()
    assert sorted((s["stage"], s["repeat"], s["seed"]) for s in stages) == [
        ("student", 0, 0), ("student", 1, 1), ("teacher", -1, 0)]
    assert os.path.isfile(cfg.out / "digits" / "lenet5-lenet300_100" / "student-s1.pt")


def test_real_sweep_cli_ctrl_c_then_resume(tmp_path):
    """SIGINT to `kdexport sweep` after its first rows: exit 130, rows kept; the rerun finishes the rest."""
    out = tmp_path / "study"
    args = ["sweep", "--pairs", "lenet5:lenet300_100", "--out", str(out), "--levels", "0:0.8:0.2",
            "--repeats", "1", "--teacher-epochs", "1", "--distill-epochs", "1", "--finetune-epochs", "1",
            "--device", "cpu", "--json"]
    # a parent started in the background (CI, `cmd &`) ignores SIGINT and children inherit that: restore it
    proc = subprocess.Popen([sys.executable, "-m", "kdexport.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    store = out / "results.sqlite"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(db_keys(store) if store.is_file() else []) < 3:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr.decode()
    assert "rerun the same command to resume" in stderr.decode()
    before = len(db_keys(store))
    assert 3 <= before < 10
    from kdexport.cli import app

    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert f"10 cells: {before} already done, {10 - before} remaining" in res.stderr
    assert json.loads(res.stdout)["ran"] == 10 - before
    keys = db_keys(store)
    assert len(keys) == len(set(keys)) == 10


def test_image_size_is_part_of_the_study_and_workers_are_not(tmp_path):
    from kdexport.sweep.runner import PipelineRunner

    def study(**kw):
        return SweepConfig(pairs=("res50-squeezenet",), levels=(0.0,), out=tmp_path, dataset="imagefolder", **kw)

    sized = study(options={"image_size": (96, 96)}, workers=3)
    cfg = PipelineRunner().run_config(sized, "res50-squeezenet")
    assert cfg.size == (96, 96) and cfg.workers == 3
    assert PipelineRunner().run_config(study(), "res50-squeezenet").size == (224, 224)  # image folders' default
    assert sized.settings() != study().settings()  # a study at another size is another study
    assert study(workers=3).settings() == study().settings()  # how the data is read is not
