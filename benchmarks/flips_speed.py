"""Speed of ``alignkit flips`` on large prediction files: read, metrics, write, end to end.

    python benchmarks/flips_speed.py [--sizes 100000 1000000] [--repeats 3] [--dir DIR]

For each size it writes (not timed) three inputs of short answers: a flips file (``id``,
``reference``, ``old``, ``new``), and two prediction-file pairs (``id``, ``reference``,
``prediction``), one with the new file in the old file's order and one with it shuffled (a hash
join on ``id``). About a third of the predictions differ from the reference only in case, spacing or
trailing punctuation and 0.1% are non-ASCII, so the default verifier (``match``, normalised) does
real work; 1000 bootstrap resamples.

Each input runs ``flips_main`` in this process (best of ``--repeats``; the first, cold run is shown
too: it pays the one-time imports of matplotlib and Arrow kernels; "total CPU" is the process CPU
time of the best run, all threads: on a shared machine the wall time depends on the other jobs, the
CPU time much less, and the wall time on an idle machine is at most the CPU time), and the phases are timed
separately through the API: read (parse + validate + join), metrics (verdicts + metrics + intervals),
write (flips.json, report.md with 50 items, flips.png). Target: 1,000,000 items in < 2 s.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import tempfile
import time
from pathlib import Path

TARGET_S = 2.0
WORDS = ["paris", "rome", "blue", "cat", "dog", "yes", "no", "true", "false", "seven"]
UNICODE = ["straße", "été", "Ǆemal", "naïve"]


def _variant(rng: random.Random, answer: str) -> str:
    """The answer written differently (same after normalisation), or as is."""
    r = rng.random()
    if r < 0.12:
        return answer.upper()
    if r < 0.22:
        return f" {answer}. "
    if r < 0.32:
        return answer.capitalize() + "!"
    return answer


def _answer(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.001:
        return rng.choice(UNICODE)
    if r < 0.6:
        return str(rng.randint(0, 999))
    return rng.choice(WORDS) + ("" if rng.random() < 0.7 else f" {rng.choice(WORDS)}")


def _prediction(rng: random.Random, answer: str, accuracy: float) -> str:
    return _variant(rng, answer) if rng.random() < accuracy else _answer(rng)


def write_inputs(directory: Path, n: int, seed: int = 0) -> dict[str, tuple[Path, ...]]:
    """The three inputs for ``n`` items (see the module docstring)."""
    rng = random.Random(seed)
    flips, old_p, new_p, new_shuffled = (directory / f"{name}_{n}.jsonl" for name in ("flips", "old", "new", "new_shuffled"))
    new_rows = []
    dumps = json.dumps
    with open(flips, "w") as f, open(old_p, "w") as fo, open(new_p, "w") as fn:
        for i in range(n):
            item = f"item-{i:07d}"
            ref = _answer(rng)
            old = _prediction(rng, ref, 0.70)
            new = _prediction(rng, ref, 0.72)
            f.write(dumps({"id": item, "reference": ref, "old": old, "new": new}) + "\n")
            fo.write(dumps({"id": item, "reference": ref, "prediction": old}) + "\n")
            line = dumps({"id": item, "reference": ref, "prediction": new}) + "\n"
            fn.write(line)
            new_rows.append(line)
    rng.shuffle(new_rows)
    new_shuffled.write_text("".join(new_rows))
    return {
        "flips file": (flips,),
        "old + new (same order)": (old_p, new_p),
        "old + new (shuffled)": (old_p, new_shuffled),
    }


def _argv(paths: tuple[Path, ...], out: Path) -> list[str]:
    if len(paths) == 1:
        return ["--predictions", str(paths[0]), "--out", str(out)]
    return ["--old", str(paths[0]), "--new", str(paths[1]), "--out", str(out)]


def time_input(paths: tuple[Path, ...], out: Path, repeats: int) -> dict[str, float]:
    from alignkit.evaluation.flip_report import (
        compute_report,
        judge,
        read_flips_file,
        read_predictions,
        write_report,
    )
    from alignkit.evaluation.flips_cli import flips_main

    totals, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        with contextlib.redirect_stdout(io.StringIO()):
            rc = flips_main(_argv(paths, out))
        totals.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        if rc != 0:
            raise RuntimeError(f"flips_main returned {rc}")
    phases = {"read": [], "metrics": [], "write": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        data = read_flips_file(paths[0]) if len(paths) == 1 else read_predictions(*paths)
        t1 = time.perf_counter()
        report = compute_report(judge(data), bootstrap=1000, settings={"verifier": "match"})
        t2 = time.perf_counter()
        write_report(report, out, show=50)
        t3 = time.perf_counter()
        for key, value in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
            phases[key].append(value)
    return {
        "cold": totals[0],
        "total": min(totals),
        "cpu": min(cpu),
        **{k: min(v) for k, v in phases.items()},
        "nfr": report.nfr,
        "mb": sum(p.stat().st_size for p in paths) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="where to write the inputs (default: a temp dir, removed after)")
    a = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory(prefix="flips_speed_") as tmp:
        directory = Path(a.dir or tmp)
        directory.mkdir(parents=True, exist_ok=True)
        rows = []
        for n in a.sizes:
            start = time.perf_counter()
            inputs = write_inputs(directory, n)
            print(f"wrote inputs for {n:,} items in {time.perf_counter() - start:.1f}s (not timed)", flush=True)
            for name, paths in inputs.items():
                r = time_input(paths, directory / f"out_{n}", a.repeats)
                rows.append((n, name, r))
                print(f"  {n:,} {name}: total {r['total']:.2f}s", flush=True)
        print()
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        print(f"best of {a.repeats} in-process runs of flips_main (total) and of each phase through the API; "
              f"cold = first flips_main run; {os.cpu_count()} CPUs, load average {load}")
        print()
        print("| items | input | MB | read s | metrics s | write s | total s | total CPU s | cold s | target < 2 s |")
        print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for n, name, r in rows:
            ok = "yes" if r["total"] < TARGET_S else "NO"
            print(f"| {n:,} | {name} | {r['mb']:.0f} | {r['read']:.2f} | {r['metrics']:.2f} | {r['write']:.2f} | "
                  f"{r['total']:.2f} | {r['cpu']:.2f} | {r['cold']:.2f} | {ok if n >= 1_000_000 else '(' + ok + ')'} |")


if __name__ == "__main__":
    main()
