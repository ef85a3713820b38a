"""Per-step negatives vs positive-only data at growing data budgets (Setlur et al. 2024, arXiv:2406.14532).

On the synthetic multi-step arithmetic task (alignkit.tasks.arithmetic), for each data budget N:

* ``sft_N``      SFT of a fresh tiny Qwen2 on N problems' gold solutions;
* ``sft_8N``     the same on 8N problems (the paper's comparison point: per-step RL on N ≈ SFT on 8N);
* ``rft_N``      from sft_N: ``--rft_samples`` samples per training problem, the verified-correct ones
                 (distinct) + the N gold solutions, more SFT (rejection fine-tuning, the paper's RFT);
* ``perstep_N/<mode>`` from sft_N, on the same N problems: on-policy samples, step values by rollouts,
                 then first-pit DPO and/or the advantage-weighted form (alignkit.trainers.perstep).

Every model is scored by greedy decoding + the math verifier on held-out problems (prompts not in any
training pool). Prints a table, writes ``results.json`` and ``perstep_scaling.png`` (matplotlib, if
installed) to ``--output_dir``.

    python benchmarks/perstep_scaling.py                       # default: N = 512, 1024 (about 20-25 minutes, 1 thread)
    python benchmarks/perstep_scaling.py --ns 256 --modes first_pit_dpo
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignkit.modeling import make_tiny_model
from alignkit.perstep_pipeline import greedy_accuracy, rft_finetune, train_sft
from alignkit.rollout.arguments import RolloutArguments
from alignkit.rollout.base import SamplingConfig
from alignkit.tasks.arithmetic import make_problems
from alignkit.trainers.perstep import PerStepConfig, PerStepTrainer
from alignkit.trainers.sft import sft_records
from alignkit.verifiers import get_verifier


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa"), \
        AutoTokenizer.from_pretrained(path)


def data(ns: list[int], test_size: int, seed: int):
    pool = make_problems(8 * max(ns), seed=seed)
    seen = {p["prompt"] for p in pool}
    test = [p for p in make_problems(test_size * 2, seed=seed + 777) if p["prompt"] not in seen][:test_size]
    return pool, test


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--modes", nargs="+", default=["first_pit_dpo", "advantage_weighted"])
    ap.add_argument("--output_dir", default="outputs/perstep_scaling")
    ap.add_argument("--hidden_size", type=int, default=128)
    ap.add_argument("--num_layers", type=int, default=4)
    ap.add_argument("--sft_steps", type=int, default=600)
    ap.add_argument("--sft_lr", type=float, default=3e-3)
    ap.add_argument("--rft_samples", type=int, default=4)
    ap.add_argument("--rft_steps", type=int, default=150)
    ap.add_argument("--rft_lr", type=float, default=5e-4)
    ap.add_argument("--perstep_steps", type=int, default=150)
    ap.add_argument("--dpo_lr", type=float, default=5e-5, help="first_pit_dpo learning rate")
    ap.add_argument("--aw_lr", type=float, default=2e-4, help="advantage_weighted learning rate")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--samples_per_problem", type=int, default=4)
    ap.add_argument("--negatives_per_problem", type=int, default=4)
    ap.add_argument("--num_rollouts", type=int, default=4)
    ap.add_argument("--best_of", type=int, default=1)
    ap.add_argument("--kl_coef", type=float, default=0.05)
    ap.add_argument("--positive_weight", type=float, default=1.0, help="advantage_weighted: weight of the chosen")
    ap.add_argument("--test_size", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip", nargs="*", default=[], help="methods to skip: sft_8N rft perstep")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("alignkit.steps").setLevel(logging.INFO)
    start = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = make_tiny_model(out / "base", "qwen2", hidden_size=args.hidden_size, num_layers=args.num_layers)
    pool, test = data(args.ns, args.test_size, args.seed)
    verifier = get_verifier("math", num_workers=1)
    results: list[dict] = []

    def record(n, method, model, tok, seconds, **extra):
        acc = greedy_accuracy(model, tok, test, verifier)
        row = {"N": n, "method": method, "accuracy": acc, "seconds": round(seconds, 1), **extra}
        results.append(row)
        note = ""
        if extra.get("records") is not None:
            note = (f"; {extra['records']} negatives ({extra['with_pit']} with a pit, {extra['groups']} groups), "
                    f"SFT model's accuracy on its training problems {extra['sample_accuracy']:.2f}")
        elif "self_generated" in extra:
            note = f"; {extra['self_generated']} self-generated correct samples"
        print(f"[{time.perf_counter() - start:6.0f}s] N={n:5d} {method:28s} accuracy {acc:.3f} ({seconds:.0f}s{note})",
              flush=True)
        (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))

    for n in args.ns:
        train = pool[:n]
        t = time.perf_counter()
        model, tok = load(base)
        model = train_sft(model, tok, sft_records(train), str(out / f"sft_{n}"), max_steps=args.sft_steps,
                          learning_rate=args.sft_lr, seed=args.seed)
        model.save_pretrained(out / f"sft_{n}")
        tok.save_pretrained(out / f"sft_{n}")
        record(n, "sft_N", model, tok, time.perf_counter() - t, problems=n)

        if "sft_8N" not in args.skip:
            t = time.perf_counter()
            model, tok = load(base)
            model = train_sft(model, tok, sft_records(pool[: 8 * n]), str(out / f"sft8_{n}"), max_steps=args.sft_steps,
                              learning_rate=args.sft_lr, seed=args.seed)
            record(n, "sft_8N", model, tok, time.perf_counter() - t, problems=8 * n)

        if "rft" not in args.skip:
            t = time.perf_counter()
            model, tok = load(out / f"sft_{n}")
            model, generated = rft_finetune(
                model, tok, train, str(out / f"rft_{n}"), samples_per_problem=args.rft_samples,
                sampling=SamplingConfig(temperature=1.0, max_new_tokens=64, seed=args.seed), verifier=verifier,
                max_steps=args.rft_steps, learning_rate=args.rft_lr, warmup_steps=10, seed=args.seed)
            record(n, "rft_N", model, tok, time.perf_counter() - t, self_generated=generated)

        if "perstep" not in args.skip:
            rollout = RolloutArguments(rollout_n=args.samples_per_problem, rollout_temperature=1.0,
                                       rollout_max_new_tokens=64, rollout_batch_size=512, verifier="math",
                                       verifier_num_workers=1)
            for mode in args.modes:
                t = time.perf_counter()
                model, tok = load(out / f"sft_{n}")
                config = PerStepConfig(
                    output_dir=str(out / f"perstep_{n}_{mode}"), records_cache_dir=str(out / f"perstep_records_{n}"),
                    mode=mode, beta=args.beta, kl_coef=args.kl_coef, positive_weight=args.positive_weight,
                    num_rollouts=args.num_rollouts, best_of=args.best_of, negatives_per_problem=args.negatives_per_problem,
                    max_steps=args.perstep_steps, per_device_train_batch_size=16, learning_rate=args.dpo_lr if mode == "first_pit_dpo" else args.aw_lr,
                    lr_scheduler_type="cosine", warmup_steps=10, max_length=256, save_strategy="no", report_to="none",
                    use_cpu=True, disable_tqdm=True, logging_steps=25, seed=args.seed,
                )
                trainer = PerStepTrainer(model, config, train_dataset=train, processing_class=tok, rollout_args=rollout)
                report = trainer.build_reports.get("train", {})
                trainer.train()
                logs = [h for h in trainer.state.log_history if "loss" in h]
                last = {k: round(v, 4) for k, v in logs[-1].items() if "/" in k} if logs else {}
                record(n, f"perstep_N/{mode}", trainer.model, tok, time.perf_counter() - t,
                       groups=len(trainer.train_dataset), records=report.get("records"), with_pit=report.get("with_pit"),
                       sample_accuracy=report.get("rollouts", {}).get("accuracy"),
                       step_value_cost=report.get("step_values"), last_logged=last)

    print(f"\nheld-out greedy accuracy (math verifier, {len(test)} problems)")
    methods = list(dict.fromkeys(r["method"] for r in results))
    print("N      " + "".join(f"{m:>30s}" for m in methods))
    for n in args.ns:
        cells = {r["method"]: r["accuracy"] for r in results if r["N"] == n}
        print(f"{n:<7d}" + "".join(f"{cells[m]:>30.3f}" if m in cells else f"{'-':>30s}" for m in methods))
    print(f"total {time.perf_counter() - start:.0f}s")
    plot(results, args.ns, out / "perstep_scaling.png")


def plot(results, ns, path):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    curves: dict[str, list] = {}
    for r in results:  # SFT on N and on 8N are points of one curve: accuracy vs problems seen
        name = "SFT (gold positives)" if r["method"] in ("sft_N", "sft_8N") else r["method"].replace("_N", "")
        curves.setdefault(name, []).append((r.get("problems", r["N"]), r["accuracy"]))
    for name, pts in curves.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training problems")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title("per-step negatives vs positive data (synthetic arithmetic)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
