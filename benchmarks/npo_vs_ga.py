"""NPO, NPO+RT, SimNPO and gradient ascent side by side on the synthetic TOFU-like task (CPU).

    python benchmarks/npo_vs_ga.py [--output_dir outputs/bench_npo_vs_ga] [--steps 160] [--eval_every 4]
                                   [--methods npo,npo_rt,simnpo,ga,ga_rt] [--lrs 1e-4,3e-4,1e-3]

1. Build (or reuse, cached in OUTPUT_DIR/models) the task's two starting points: a tiny Qwen2
   (hidden 128, 4 layers) fine-tuned on every fact ("full") and the same initialisation fine-tuned on
   the retain split only ("retain", the model that never saw the forget set); see
   :mod:`alignkit.tasks.synthetic_tofu_models`.
2. Unlearn the forget split (forget10: 4 of 40 people, 20 QA pairs) from the full model with each
   method and each learning rate, for ``--steps`` optimizer steps (batch 4 forget + 4 retain examples,
   constant learning rate, AdamW), evaluating every ``--eval_every`` steps:
   forget-set probability (mean P(a|q)^(1/|a|) over the forget QA pairs), retain-set model utility
   (TOFU's harmonic mean of retain probability, ROUGE-L recall and truth-ratio score, on a fixed
   sample of ``--retain_eval`` retain QA pairs) and forget quality (KS p-value against the retain model).
3. Compare at *equal forget-set probability*: for a level L, the retain utility (as a share of the
   full model's) where a run's forget probability first falls to L (interpolated between the two
   evaluations around the crossing, linearly in log-probability). Levels: the retain model's own
   forget probability (what a model that never saw the facts assigns them: the natural target) and
   stricter ones, 0.01 and 0.001. Each method is compared at each level with its best learning rate
   for that level. The state after the last step (forget probability, utility, forget quality) shows
   what happens when training goes on past the level.

Prints the tables, writes ``results.json`` and ``npo_vs_ga.png`` (curves over steps and utility
against forget probability, every method at the same learning rate, ``--plot_lr``) in the output
directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METHOD_NAMES = {"npo": "NPO", "npo_rt": "NPO+RT", "npo_kl": "NPO+KL", "simnpo": "SimNPO", "simnpo_rt": "SimNPO+RT",
                "ga": "GA", "ga_rt": "GA+RT", "ga_kl": "GA+KL"}


def evaluate_point(model, tokenizer, forget_items, retain_items, reference_ratios, full_utility):
    from alignkit.evaluation.unlearning import evaluate_split, forget_quality, model_utility

    forget = evaluate_split(model, tokenizer, forget_items, role="forget", generate=False)
    retain = evaluate_split(model, tokenizer, retain_items, role="retain", generate=True, max_new_tokens=24)
    s = retain["summary"]
    utility = model_utility([s["probability"], s["rouge_l_recall"], s["truth_ratio"]])
    ratios = [r["truth_ratio"] for r in forget["items"]]
    return {
        "forget_probability": forget["summary"]["probability"],
        "forget_quality": forget_quality(ratios, reference_ratios)["forget_quality"],
        "retain_probability": s["probability"],
        "retain_rouge_l_recall": s["rouge_l_recall"],
        "retain_truth_ratio": s["truth_ratio"],
        "retain_utility": utility,
        "retain_utility_kept": utility / full_utility,
    }


def run_method(method: str, lr: float, args, paths, forget_items, retain_items, reference_ratios, full_point) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback

    from alignkit.tasks import synthetic_tofu
    from alignkit.trainers import NPOConfig, NPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(paths["full"])
    model = AutoModelForCausalLM.from_pretrained(paths["full"], dtype=torch.float32)
    curve = [{"step": 0, **full_point}]

    class Probe(TrainerCallback):
        def on_step_end(self, _args, state, control, model=None, **kw):
            if state.global_step % args.eval_every == 0:
                point = evaluate_point(model, tokenizer, forget_items, retain_items, reference_ratios,
                                       full_point["retain_utility"])
                curve.append({"step": state.global_step, **point})
                model.train()

    config = NPOConfig(
        output_dir=str(Path(args.output_dir) / "runs" / f"{method}-lr{lr:g}"),
        loss_type=method,
        learning_rate=lr,
        lr_scheduler_type="constant",
        weight_decay=0.01,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        logging_steps=args.eval_every,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        max_length=128,
        disable_tqdm=True,
    )
    spec = synthetic_tofu.SyntheticTofuSpec()
    trainer = NPOTrainer(
        model=model, args=config, processing_class=tokenizer,
        train_dataset=synthetic_tofu.records(args.forget_split, spec),
        retain_dataset=synthetic_tofu.records(args.retain_split, spec) if method.endswith(("_rt", "_kl")) else None,
        callbacks=[Probe()],
    )
    trainer.remove_callback(PrinterCallback)  # the tables below say what matters
    start = time.perf_counter()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss/forget" in h]
    return {"method": method, "learning_rate": lr, "curve": curve, "train_logs": logs,
            "seconds": time.perf_counter() - start}


def crossing(curve: list[dict], level: float) -> dict | None:
    """Where the forget probability first falls to ``level``: the step and every metric there,
    interpolated between the two evaluations around the crossing, linearly in log forget-probability
    (``None`` if it never does)."""
    numbers = lambda p: {k: v for k, v in p.items() if isinstance(v, (int, float))}  # noqa: E731
    if curve[0]["forget_probability"] <= level:
        return numbers(curve[0])
    for before, after in zip(curve, curve[1:]):
        a, b = before["forget_probability"], after["forget_probability"]
        if b <= level < a:
            t = (math.log(a) - math.log(level)) / (math.log(a) - math.log(b))
            return {k: before[k] + t * (after[k] - before[k]) for k in numbers(before)}
    return None


def best_at_level(runs: list[dict], level: float) -> tuple[dict, dict] | tuple[None, None]:
    """The run (learning rate) that keeps the most retain utility where it reaches ``level``, and that point."""
    hits = [(run, crossing(run["curve"], level)) for run in runs]
    hits = [(run, hit) for run, hit in hits if hit is not None]
    return max(hits, key=lambda rh: rh[1]["retain_utility"]) if hits else (None, None)


def fmt(x, digits=3):
    if x is None:
        return "—"
    if isinstance(x, float) and (x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e4)):
        return f"{x:.1e}"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def table(rows: list[list], header: list[str]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def plot(shown: dict[str, dict], levels: dict[str, float], path: Path) -> None:
    """Forget probability and retain utility over steps, and utility against forget probability, for one
    run per method (the same learning rate for all)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method, run in shown.items():
        steps = [p["step"] for p in run["curve"]]
        label = f"{METHOD_NAMES.get(method, method)} (lr {run['learning_rate']:g})"
        axes[0].plot(steps, [p["forget_probability"] for p in run["curve"]], marker=".", label=label)
        axes[1].plot(steps, [p["retain_utility_kept"] for p in run["curve"]], marker=".", label=label)
        axes[2].plot([p["forget_probability"] for p in run["curve"]], [p["retain_utility_kept"] for p in run["curve"]],
                     marker=".", label=label)
    axes[0].set(xlabel="step", ylabel="forget-set probability", yscale="log", title="Forgetting")
    axes[1].set(xlabel="step", ylabel="retain utility / full model's", title="Retain utility", ylim=(-0.02, 1.1))
    axes[2].set(xlabel="forget-set probability", ylabel="retain utility / full model's", xscale="log",
                title="Utility at equal forgetting", ylim=(-0.02, 1.1), xlim=(1.5, 1e-5))
    for name, level in levels.items():
        axes[0].axhline(level, color="grey", lw=0.6, ls=":")
        axes[2].axvline(level, color="grey", lw=0.6, ls=":")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="outputs/bench_npo_vs_ga")
    parser.add_argument("--methods", default="npo,npo_rt,simnpo,ga,ga_rt")
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3", help="learning rates tried for every method")
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--eval_every", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--forget_split", default="forget10")
    parser.add_argument("--retain_eval", type=int, default=60, help="retain QA pairs in the utility sample")
    parser.add_argument("--plot_lr", type=float, default=3e-4, help="the learning rate (nearest in --lrs) plotted")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this tiny model)")
    a = parser.parse_args(argv)
    a.retain_split = "retain" + str(100 - int(a.forget_split.removeprefix("forget")))

    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from alignkit.evaluation.unlearning import load_results
    from alignkit.tasks import synthetic_tofu, synthetic_tofu_models

    torch.set_num_threads(a.threads)
    hf_logging.set_verbosity_error()
    out = Path(a.output_dir)
    t0 = time.perf_counter()
    paths = synthetic_tofu_models.build_task_models(out / "models", forget_split=a.forget_split)
    print(f"task models ready in {time.perf_counter() - t0:.0f}s: {paths['full']}, {paths['retain']}")
    spec = synthetic_tofu.SyntheticTofuSpec()
    forget_items = synthetic_tofu.eval_items(a.forget_split, spec)
    retain_all = synthetic_tofu.eval_items(a.retain_split, spec)
    retain_items = sorted(random.Random(0).sample(retain_all, min(a.retain_eval, len(retain_all))), key=lambda x: x["id"])
    reference = load_results(Path(paths["retain"]) / "eval.json")
    reference_ratios = [r["truth_ratio"] for r in reference["splits"]["forget"]["items"]]

    tokenizer = AutoTokenizer.from_pretrained(paths["full"])
    points = {}
    for name in ("full", "retain"):
        model = AutoModelForCausalLM.from_pretrained(paths[name], dtype=torch.float32)
        points[name] = evaluate_point(model, tokenizer, forget_items, retain_items, reference_ratios, 1.0)
    full_utility = points["full"]["retain_utility"]
    for p in points.values():
        p["retain_utility_kept"] = p["retain_utility"] / full_utility
    full_point = points["full"]

    methods = a.methods.split(",")
    lrs = [float(x) for x in a.lrs.split(",")]
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for method in methods:
        for lr in lrs:
            run = run_method(method, lr, a, paths, forget_items, retain_items, reference_ratios, full_point)
            last = run["curve"][-1]
            print(f"  {METHOD_NAMES.get(method, method):8s} lr {lr:<7g} {run['seconds']:5.0f}s  final: forget prob "
                  f"{last['forget_probability']:.3f}, utility kept {last['retain_utility_kept']:.3f}, "
                  f"forget quality {last['forget_quality']:.2g}", flush=True)
            runs[method].append(run)

    retain_level = points["retain"]["forget_probability"]
    levels = {f"retain model's ({retain_level:.3f})": retain_level, "0.01": 0.01, "0.001": 0.001}
    plot_lr = min(lrs, key=lambda lr: abs(math.log(lr / a.plot_lr)))
    shown = {m: next(r for r in runs[m] if r["learning_rate"] == plot_lr) for m in methods}

    print(f"\nStarting points (retain utility on {len(retain_items)} retain QA pairs; forget quality = KS p-value "
          "of forget truth ratios vs the retain model):")
    print(table([[name, fmt(p["forget_probability"]), fmt(p["retain_utility"]), fmt(p["retain_utility_kept"]),
                  fmt(p["forget_quality"])] for name, p in points.items()],
                ["model", "forget prob", "retain utility", "utility kept", "forget quality"]))

    def cell(hit):
        return f"{fmt(hit['retain_utility_kept'])} @{hit['step']:.0f}" if hit else "—"

    print("\nAll runs: retain utility kept (share of the full model's) where the forget probability first reaches "
          "each level (@ step, interpolated); '—' = never within the steps; then the state after the last step")
    rows = []
    for method in methods:
        for run in runs[method]:
            last = run["curve"][-1]
            rows.append([METHOD_NAMES.get(method, method), f"{run['learning_rate']:g}",
                         *[cell(crossing(run["curve"], level)) for level in levels.values()],
                         fmt(last["forget_probability"]), fmt(last["retain_utility_kept"]), fmt(last["forget_quality"])])
    print(table(rows, ["method", "lr", *[f"p_forget <= {k}" for k in levels], f"p_forget @{a.steps}",
                       f"kept @{a.steps}", f"FQ @{a.steps}"]))

    print("\nAt equal forget-set probability, best learning rate per method and level: utility kept "
          "(lr, step; forget quality there)")
    rows, per_level = [], {}
    for method in methods:
        row = [METHOD_NAMES.get(method, method)]
        for name, level in levels.items():
            run, hit = best_at_level(runs[method], level)
            per_level[method, name] = hit
            row.append(f"{fmt(hit['retain_utility_kept'])} (lr {run['learning_rate']:g}, @{hit['step']:.0f}; "
                       f"FQ {fmt(hit['forget_quality'], 2)})" if hit else "— (not reached)")
        rows.append(row)
    print(table(rows, ["method", *[f"p_forget <= {k}" for k in levels]]))

    if "npo_rt" in methods and "ga" in methods:
        print("\nTarget: at equal forget-set probability, NPO+RT keeps >= 90% of the retain utility and GA < 50%:")
        for name in levels:
            npo_rt, ga = per_level["npo_rt", name], per_level["ga", name]
            if npo_rt is None or ga is None:
                verdict = "not comparable (a method never reached this level)"
            else:
                met = npo_rt["retain_utility_kept"] >= 0.9 and ga["retain_utility_kept"] < 0.5
                verdict = "met" if met else "not met"
            print(f"  p_forget <= {name}: NPO+RT {fmt(npo_rt['retain_utility_kept']) if npo_rt else '—'}, "
                  f"GA {fmt(ga['retain_utility_kept']) if ga else '—'} -> {verdict}")

    plot(shown, levels, out / "npo_vs_ga.png")
    (out / "results.json").write_text(json.dumps(
        {"settings": vars(a), "levels": levels, "points": points, "runs": runs,
         "at_level": {f"{m}|{name}": hit for (m, name), hit in per_level.items()},
         "plotted_learning_rate": plot_lr}, indent=2))
    print(f"\nwrote {out / 'results.json'} and {out / 'npo_vs_ga.png'} ({time.perf_counter() - t0:.0f}s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
