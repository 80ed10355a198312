"""Independent stages side by side: worker processes forked from this one, each with its share of the threads.

On a CPU, the small models of a `compress` run (a MobileNet at 32 px, its pruned copies) use a second thread
poorly, so two stages on one thread each finish sooner than the same stages one after another on two threads
(benchmarks/RESULTS.md). Workers are forked, not spawned: each starts with everything this process holds in
memory, the teacher memo included (distill.TeacherMemo), so fine-tuning still finds the distilled batches' teacher
outputs. A forked child cannot use CUDA, so GPU runs, and image folders (whose DataLoader workers already use the
cores), run their stages one after another.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

import torch

from .errors import ConfigError
from .train import plain_progress

Call = tuple[Callable[..., Any], tuple[Any, ...]]
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def check_jobs(jobs: int | None) -> None:
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ConfigError(f"--jobs must be a whole number >= 1, got {jobs!r}")


def stage_jobs(jobs: int | None, device: torch.device, in_memory: bool) -> int:
    """How many stages run at once: `jobs` (--jobs), by default one per torch thread of this process on a CPU
    with in-memory data, else one. More than one on a GPU is refused: forked workers cannot use CUDA."""
    check_jobs(jobs)
    parallel_ok = device.type == "cpu" and "fork" in multiprocessing.get_all_start_methods()
    if jobs is None:
        return torch.get_num_threads() if parallel_ok and in_memory else 1
    if jobs > 1 and not parallel_ok:
        raise ConfigError(f"--jobs {jobs} runs stages in forked CPU processes, which cannot use {device.type}; "
                          "pass --jobs 1")
    return jobs


def run_side_by_side(calls: Sequence[Call], jobs: int,
                     done: Callable[[int, Any], None] | None = None) -> list[Any]:
    """`fn(*args)` for every call, at most `jobs` at a time; the results in the calls' order.

    `done(i, result)` is called in this process as each finishes. With `jobs` 1 the calls run here, in order.
    Otherwise each runs in a forked worker with torch.get_num_threads() // jobs threads and one progress line per
    epoch instead of a live bar. When a call fails, none starts after it, the running ones finish (whatever they
    write is kept for the next run), and its exception is raised here.
    """
    results: list[Any] = [None] * len(calls)
    jobs = min(jobs, len(calls))
    if jobs <= 1:
        for i, (fn, args) in enumerate(calls):
            results[i] = fn(*args)
            if done is not None:
                done(i, results[i])
        return results
    threads = max(1, torch.get_num_threads() // jobs)
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"), initializer=_worker,
                               initargs=(threads, os.getpid()))
    waiting, running = list(enumerate(calls)), {}
    failed: BaseException | None = None
    try:
        while waiting or running:
            while waiting and len(running) < jobs and failed is None:  # a call starts only when a worker is free
                i, (fn, args) = waiting.pop(0)
                running[pool.submit(fn, *args)] = i
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                i = running.pop(future)
                if future.exception() is not None:
                    failed = failed or future.exception()
                    continue
                results[i] = future.result()
                if done is not None:
                    done(i, results[i])
    finally:  # also on Ctrl-C, which the workers receive too
        pool.shutdown(wait=True, cancel_futures=True)
    if failed is not None:
        raise failed
    return results


def _worker(threads: int, parent: int) -> None:
    _die_with(parent)
    torch.set_num_threads(threads)
    plain_progress()


def _die_with(parent: int) -> None:
    """On Linux, the worker is killed when the run's process dies, however it dies (Ctrl-C reaches the workers
    anyway): no orphan goes on training, writing the run directory, or holding its lock."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)
