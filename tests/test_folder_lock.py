"""A killed run's `.scfm.lock` is taken over by exactly one of the runs that find it at once (weights/atomic.py
folder_lock): each used to delete "the stale lock" by name, and a later delete removed the lock an earlier run
had just made, so two runs wrote into one folder. Where the take-over cannot be made safe, nothing is taken over."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import types

import pytest

from weights import atomic
from weights.io import WeightsError

pytestmark = pytest.mark.skipif(os.name != "posix", reason="a lock is taken over only where pids can be probed")


def _gone_pid(ctx) -> int:
    """The pid of a process that has ended: what a killed run's lock names."""
    p = ctx.Process(target=int)
    p.start()
    p.join()
    return p.pid


def _contend(folder, judged, delay, results, release):
    """One run starting on `folder`: it reads the stale lock and judges its process gone, waits until every other
    run has too (`judged`), then `delay` seconds more, and tries to take the folder over."""
    real, calls = atomic._pid_alive, []

    def judging(pid: int) -> bool:
        if not calls:  # the first judgement only: the lock every run found
            calls.append(pid)
            judged.wait(10)
            time.sleep(delay)  # staggered: one run's new lock exists before the next run acts on its judgement
        return real(pid)

    atomic._pid_alive = judging  # this forked process's copy of the module only
    try:
        with atomic.folder_lock(folder, "training run"):
            results.put(("held", os.getpid()))
            release.wait(10)  # hold it until every run has had its try
    except WeightsError as e:
        results.put(("refused", str(e)))


@pytest.mark.parametrize("delays", [(0.0, 0.03, 0.06), (0.0, 0.0, 0.0), (0.0, 0.0, 0.03)])
def test_runs_that_find_a_killed_runs_lock_at_once_take_it_over_one_at_a_time(tmp_path, delays):
    ctx = mp.get_context("fork")
    gone = _gone_pid(ctx)
    for trial in range(3):
        folder = tmp_path / str(trial)
        folder.mkdir()
        (folder / ".scfm.lock").write_text(f"{atomic._WRITER} {gone}\n")
        judged, results, release = ctx.Barrier(len(delays)), ctx.Queue(), ctx.Event()
        runs = [ctx.Process(target=_contend, args=(folder, judged, d, results, release)) for d in delays]
        for p in runs:
            p.start()
        try:
            got = [results.get(timeout=20) for _ in runs]
        except queue.Empty:
            got = None
        release.set()
        for p in runs:
            p.join(20)
        assert got is not None and [p.exitcode for p in runs] == [0] * len(runs), (got, [p.exitcode for p in runs])
        held = [pid for what, pid in got if what == "held"]
        assert len(held) == 1, f"trial {trial}: {got}"
        for what, err in got:  # the others are refused as by any live run, naming the winner
            assert what == "held" or err.startswith(f"{folder}: another training run is using it (process {held[0]} "
                                                    f"on this machine)"), err
        assert not (folder / ".scfm.lock").exists()  # the winner's lock went with it


def test_a_killed_runs_lock_is_kept_where_the_take_over_cannot_be_locked(tmp_path, monkeypatch):
    """A file system that refuses flock (some network and FUSE ones): the lock stays, the run is refused in one
    line saying what to delete, rather than risk two runs holding the folder."""
    ctx = mp.get_context("fork")
    lock = tmp_path / ".scfm.lock"
    stale = f"{atomic._WRITER} {_gone_pid(ctx)}\n"
    lock.write_text(stale)

    def refused(fd, op):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(atomic, "fcntl", types.SimpleNamespace(LOCK_EX=2, flock=refused))
    with pytest.raises(WeightsError) as e:
        with atomic.folder_lock(tmp_path, "training run"):
            pass
    assert str(e.value) == (f"{tmp_path}: {lock} was left by a killed training run (process {stale.split()[1]}, "
                            f"gone), but this file system cannot lock it to take it over safely (Function not "
                            f"implemented); delete it and run again")
    assert lock.read_text() == stale
    monkeypatch.undo()
    with atomic.folder_lock(tmp_path, "training run"):  # where flock works, the same lock is taken over
        assert lock.read_text() == f"{atomic._WRITER} {os.getpid()}\n"
    assert not lock.exists()
