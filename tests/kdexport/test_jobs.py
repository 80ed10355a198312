"""kdexport.jobs: stages side by side in forked workers, results in order, failures surfaced, one manifest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdexport.distill import TeacherMemo
from kdexport.errors import ConfigError, TrainingError
from kdexport.jobs import check_jobs, run_side_by_side, stage_jobs
from kdexport.manifest import read_manifest, record_stage
from kdexport.pipeline import RunConfig


def where(tag: str) -> tuple[str, int, int]:
    return tag, os.getpid(), torch.get_num_threads()


def slow_then_write(path: str, seconds: float) -> str:
    time.sleep(seconds)
    Path(path).write_text("done")
    return path


def fail(message: str) -> None:
    raise TrainingError(message)


def memo_entries() -> int:
    return len(TeacherMemo._store)


def record(run_dir: str, name: str) -> None:
    record_stage(Path(run_dir), RunConfig(pair="lenet5:lenet300_100"), name, {"path": f"{name}.pt"})


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_results_come_back_in_call_order_from_workers_with_their_share_of_threads(two_threads):
    finished = []
    out = run_side_by_side([(where, (t,)) for t in "abcde"], jobs=2, done=lambda i, r: finished.append(i))
    assert [tag for tag, _, _ in out] == list("abcde")
    assert all(pid != os.getpid() for _, pid, _ in out)  # forked workers, not this process
    assert {threads for _, _, threads in out} == {1}  # two threads shared by two workers
    assert sorted(finished) == [0, 1, 2, 3, 4]  # `done` runs here, once per call
    assert torch.get_num_threads() == 2  # this process keeps its own setting


def test_one_job_runs_here_in_order():
    finished = []
    out = run_side_by_side([(where, (t,)) for t in "ab"], jobs=1, done=lambda i, r: finished.append(i))
    assert [(tag, pid) for tag, pid, _ in out] == [("a", os.getpid()), ("b", os.getpid())]
    assert finished == [0, 1]


def test_a_failure_is_raised_here_after_the_running_stage_finishes(tmp_path):
    slow = tmp_path / "slow.txt"
    queued = [tmp_path / f"queued-{i}.txt" for i in range(6)]
    calls = [(slow_then_write, (str(slow), 1.0)), (fail, ("loss became nan",)),
             *[(slow_then_write, (str(q), 0.3)) for q in queued]]
    with pytest.raises(TrainingError, match="loss became nan"):
        run_side_by_side(calls, jobs=2)
    assert slow.read_text() == "done"  # it was running: what it wrote is kept for the next run
    assert not any(q.exists() for q in queued)  # none starts after a failure


def test_workers_see_this_process_memory():
    """Forked, not spawned: fine-tuning in a worker finds the teacher outputs distillation left in the memo."""
    key = b"test-key-" + os.urandom(8)
    TeacherMemo._store[key] = torch.zeros(3)
    try:
        before = len(TeacherMemo._store)
        assert run_side_by_side([(memo_entries, ()), (memo_entries, ())], jobs=2) == [before, before]
    finally:
        TeacherMemo._store.pop(key)


def test_stages_side_by_side_all_reach_the_manifest(tmp_path):
    names = [f"stage-{i}" for i in range(8)]
    run_side_by_side([(record, (str(tmp_path), n)) for n in names], jobs=4)
    assert set(read_manifest(tmp_path)["stages"]) == set(names)
    json.loads((tmp_path / "manifest.json").read_text())  # whole, not interleaved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]  # the lock leaves no file


def test_how_many_stages_run_at_once(two_threads):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert stage_jobs(None, cpu, in_memory=True) == 2  # one per thread
    assert stage_jobs(None, cpu, in_memory=False) == 1  # image folders: DataLoader workers use the cores
    assert stage_jobs(None, cuda, in_memory=True) == 1
    assert stage_jobs(3, cpu, in_memory=False) == 3
    assert stage_jobs(1, cuda, in_memory=True) == 1
    with pytest.raises(ConfigError, match="cannot use cuda; pass --jobs 1"):
        stage_jobs(2, cuda, in_memory=True)


@pytest.mark.parametrize("jobs", [0, -1, 1.5, True])
def test_bad_jobs_are_refused(jobs):
    with pytest.raises(ConfigError, match="--jobs must be a whole number >= 1"):
        check_jobs(jobs)


def write_pid_and_sleep(path: str) -> None:
    Path(path).write_text(str(os.getpid()))
    time.sleep(60)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers follow their parent's death on Linux only")
def test_workers_die_with_a_killed_run(tmp_path):
    """SIGKILL of the run's process (no cleanup runs) leaves no worker training on, or holding the run's lock."""
    pid_file = tmp_path / "worker.pid"
    script = ("import sys; sys.path[:0] = sys.argv[1:2]\n"
              "from tests.kdexport.test_jobs import write_pid_and_sleep\n"
              "from kdexport.jobs import run_side_by_side\n"
              f"run_side_by_side([(write_pid_and_sleep, ({str(pid_file)!r},)), (write_pid_and_sleep, ('/dev/null',))],"
              " jobs=2)\n")
    run = subprocess.Popen([sys.executable, "-c", script, str(Path(__file__).resolve().parents[2])])
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert run.poll() is None and time.monotonic() < deadline, "the worker never started"
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        deadline = time.monotonic() + 10
        while _alive(worker):
            assert time.monotonic() < deadline, "the worker outlived the killed run"
            time.sleep(0.1)
    finally:
        run.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a killed child of ours that init has not reaped yet is a zombie: dead
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
