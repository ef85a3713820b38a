"""The verifiers' worker pool: warm across batches and verifiers, chunked, serial for small batches,
and a dead worker fails only its chunk."""

import os

import pytest

from alignkit.verifiers import base
from alignkit.verifiers.base import CallableVerifier, Verdict, close_worker_pools


def which_process(problem, completion) -> Verdict:
    """Reports the process that judged the item (and echoes the item, to check the order)."""
    return Verdict(True, 1.0, f"{os.getpid()}:{completion}")


def other_check(problem, completion) -> Verdict:
    return Verdict(False, 0.0, f"{os.getpid()}:{completion}")


def dies_on_poison(problem, completion) -> Verdict:
    if completion == "poison":
        os._exit(3)  # a worker killed mid-chunk (out of memory, a crash in C)
    return Verdict(True, 1.0, f"{os.getpid()}:{completion}")


def run(verifier, n: int, workers: int = 2, poison_at: int | None = None) -> list[Verdict]:
    texts = [("poison" if i == poison_at else str(i)) for i in range(n)]
    return verifier.verify_batch([{"answer": 0}] * n, texts, num_workers=workers)


def pids(verdicts) -> set[int]:
    return {int(v.reason.split(":")[0]) for v in verdicts if not v.reason.startswith("error")}


@pytest.fixture(autouse=True)
def fresh_pool():
    close_worker_pools()
    yield
    close_worker_pools()


def pool_processes() -> set[int]:
    return set(base._POOL._processes)  # the pids of the warm pool's workers


def test_pool_stays_warm_across_batches_and_verifiers():
    first = run(CallableVerifier(which_process), 400)
    assert [v.reason.split(":")[1] for v in first] == [str(i) for i in range(400)]  # order kept
    workers = pool_processes()
    assert len(workers) == 2 and os.getpid() not in workers and pids(first) <= workers
    pool = base._POOL
    second = run(CallableVerifier(which_process), 400)
    third = run(CallableVerifier(other_check), 400)  # another verifier travels with its chunks
    assert base._POOL is pool and pool_processes() == workers
    assert pids(second) <= workers and pids(third) <= workers
    assert not any(v.correct for v in third)


def test_small_batches_run_in_this_process():
    verifier = CallableVerifier(which_process)
    assert pids(run(verifier, 2 * verifier.parallel_min_items - 1)) == {os.getpid()}
    assert base._POOL is None  # no pool was started for it
    assert os.getpid() not in pids(run(verifier, 2 * verifier.parallel_min_items))


def test_a_pool_of_another_size_replaces_the_warm_one():
    run(CallableVerifier(which_process), 400, workers=2)
    pool = base._POOL
    verdicts = run(CallableVerifier(which_process), 400, workers=3)
    assert base._POOL is not pool and len(pool_processes()) == 3 and pids(verdicts) <= pool_processes()


def test_a_dead_worker_fails_only_its_chunk_and_the_pool_restarts():
    verdicts = run(CallableVerifier(dies_on_poison), 400, poison_at=7)
    dead = [i for i, v in enumerate(verdicts) if v.reason == "error: worker process died"]
    assert dead == list(range(50))  # the chunk (400 items / (2 workers * 4)) that held the poison
    assert all(v.correct and v.reason.endswith(f":{i}") for i, v in enumerate(verdicts) if i not in dead)
    after = run(CallableVerifier(which_process), 400)  # on a new pool
    assert all(v.correct for v in after) and len(pool_processes()) == 2 and pids(after) <= pool_processes()
