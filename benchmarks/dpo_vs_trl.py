"""alignkit DPOTrainer vs trl.DPOTrainer (TRL 1.16): tokens per CPU-second and peak memory growth, side by side.

    python benchmarks/dpo_vs_trl.py [--vocabs 450,32000,151936] [--modes full,lora] [--ratios 1,4]
                                    [--steps 3] [--warmup 1] [--batch 2] [--response_tokens 32] [--threads 1]
                                    [--repeats 1] [--json out.json [--resume]]

Model: a Qwen2 of ~14M parameters before its embedding (hidden 384, 6 layers, tied embeddings, the tiny
tokenizer), built offline, with its vocabulary resized to each ``--vocabs`` size (the output head grows
with it, as in real models: 32,000 is Llama-2's, 151,936 Qwen2's; the extra rows are never targets).
Data: synthetic preference pairs whose prompt:response token lengths are ``ratio``:1.
Settings: ``full`` (full fine-tuning, a frozen reference copy) and ``lora`` (r = 16 on all linear layers,
the reference is the adapter-disabled model). fp32 everywhere (TRL's bf16 default is turned off), one
torch thread.

Rows, each trained for ``warmup + steps`` optimizer steps in a fresh subprocess:

* ``TRL default``: ``trl.DPOConfig`` as shipped (gradient checkpointing on);
* ``TRL best``: TRL's best CPU settings, gradient checkpointing off;
* ``TRL best, precomputed ref``: the same with ``precompute_ref_log_probs=True`` (no reference forward in the
  training steps);
* ``alignkit``: ``alignkit.trainers.DPOTrainer`` with its defaults (``score_layout='auto'``: the prompt runs once
  with a KV cache for both responses, :mod:`alignkit.data.collate`; the tiled output head,
  :mod:`alignkit.output_head`);
* ``alignkit, precomputed ref``: ``reference='precomputed'``.

Measures:

* tokens per CPU-second: tokens of (prompt + chosen) + (prompt + rejected) per pair, the same count for every
  row, divided by the process CPU time (``time.process_time``) of the timed steps (the median step times their
  number, so one step slowed by a busy machine does not count): the load of other processes on a shared
  machine inflates wall time, much less this. Wall-clock tokens/s are kept in the JSON;
* peak memory growth: CUDA max allocated on a GPU; on CPU the peak resident set (VmHWM, reset through
  /proc/self/clear_refs) during training minus the resident set just before it. Model loading (its weights
  paged in first: safetensors maps them lazily, and at vocab 151,936 the first step would otherwise count
  ~270 MB of page-ins), trainer set-up and the precomputation of reference log-probs (TRL does it in its
  constructor, alignkit before its first dataloader; both are run before the measurement) are excluded.

With ``--repeats N`` every implementation runs N times, the passes rotating through the implementations (every
other pass in reverse order) so that each meets the machine's load at several moments; the table keeps each
one's best tokens per CPU-second (its run least slowed by other processes) and its median memory growth.

Speed-ups compare alignkit with TRL at its best (no gradient checkpointing): live reference with live
reference, precomputed with precomputed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

IMPLEMENTATIONS = ("trl-default", "trl-best", "trl-best-precomputed", "alignkit", "alignkit-precomputed")
TITLES = {"trl-default": "TRL default", "trl-best": "TRL best", "trl-best-precomputed": "TRL best, precomputed ref",
          "alignkit": "alignkit", "alignkit-precomputed": "alignkit, precomputed ref"}
BASE_MODEL = "alignkit-bench-qwen2-14m"


def bench_model(vocab: int) -> str:
    """The benchmark model with its vocabulary (embedding and tied head) resized to ``vocab``; built once."""
    from alignkit.modeling import make_tiny_model

    base = make_tiny_model(os.path.join(tempfile.gettempdir(), BASE_MODEL), "qwen2", hidden_size=384, num_layers=6)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.join(tempfile.gettempdir(), f"{BASE_MODEL}-vocab{vocab}")
    marker = os.path.join(path, "alignkit_bench_vocab.json")
    if os.path.exists(marker):
        return path
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if vocab != model.config.vocab_size:
        torch.manual_seed(0)
        model.resize_token_embeddings(vocab, mean_resizing=False)
    tmp = tempfile.mkdtemp(dir=tempfile.gettempdir())
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    with open(os.path.join(tmp, "alignkit_bench_vocab.json"), "w") as f:
        json.dump({"vocab": vocab, "base": base}, f)
    try:
        os.rename(tmp, path)
    except OSError:  # built by another process meanwhile
        pass
    return path


def _pairs(tokenizer, n: int, prompt_tokens: int, response_tokens: int, seed: int = 0):
    """Preference pairs whose prompt and responses are about the given token lengths."""
    from alignkit.tasks.arithmetic import make_preference_pairs

    pool = make_preference_pairs(4 * n + 64, seed=seed)

    def fill(texts, target):
        out, k = "", 0
        while len(tokenizer(out).input_ids) < target:
            out += texts[k % len(texts)] + "\n"
            k += 1
        return tokenizer.decode(tokenizer(out).input_ids[:target])

    pairs = []
    for i in range(n):
        a, b = pool[2 * i], pool[2 * i + 1]
        pairs.append({"prompt": fill([a["prompt"], b["prompt"]], prompt_tokens),
                      "chosen": fill([a["chosen"], b["chosen"]], response_tokens),
                      "rejected": fill([a["rejected"], b["rejected"]], response_tokens)})
    return pairs


def _pair_tokens(tokenizer, pairs) -> list[int]:
    out = []
    for p in pairs:
        n_prompt = len(tokenizer(p["prompt"]).input_ids)
        out.append(2 * n_prompt + len(tokenizer(p["chosen"]).input_ids) + len(tokenizer(p["rejected"]).input_ids))
    return out


def _rss_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args) -> dict:
    import resource

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    total_steps = args.warmup + args.steps
    n = args.batch * total_steps
    pairs = _pairs(tokenizer, n, args.response_tokens * args.ratio, args.response_tokens)
    tokens = _pair_tokens(tokenizer, pairs)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():  # page the memory-mapped weights in now, so the first step does not count them
        for p in model.parameters():
            p.sum()
    peft_config = None
    if args.mode == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")

    class Timer(TrainerCallback):
        def __init__(self):
            self.cpu, self.wall = [], []

        def on_step_begin(self, a, state, control, **kw):
            self.t0 = (time.process_time(), time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            self.cpu.append(time.process_time() - self.t0[0])
            self.wall.append(time.perf_counter() - self.t0[1])

    timer = Timer()
    cuda = torch.cuda.is_available()
    common = dict(output_dir=tempfile.mkdtemp(), max_steps=total_steps, per_device_train_batch_size=args.batch,
                  learning_rate=1e-5, report_to="none", save_strategy="no", logging_steps=10_000, seed=0,
                  use_cpu=not cuda, max_length=None, disable_tqdm=True, train_sampling_strategy="sequential",
                  bf16=False, dataloader_num_workers=0)
    precomputed = args.impl.endswith("-precomputed")
    if args.impl.startswith("trl"):
        import trl
        from datasets import Dataset

        if args.impl != "trl-default":
            common["gradient_checkpointing"] = False
        config = trl.DPOConfig(loss_type=["sigmoid"], beta=0.1, precompute_ref_log_probs=precomputed, **common)
        trainer = trl.DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(pairs),
                                 processing_class=tokenizer, peft_config=peft_config, callbacks=[timer])
        checkpointing = config.gradient_checkpointing
    else:
        from alignkit.trainers import DPOConfig, DPOTrainer

        config = DPOConfig(beta=0.1, reference="precomputed" if precomputed else "auto", **common)
        trainer = DPOTrainer(model=model, args=config, train_dataset=pairs, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[timer])
        trainer.get_train_dataloader()  # precomputed reference log-probs are ready after this (TRL: its constructor)
        checkpointing = config.gradient_checkpointing

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    reset = _reset_peak_rss()
    rss_before = _rss_kb("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainer.train()
    if cuda:
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _rss_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mb = (peak - rss_before) / 1024
    timed = slice(args.warmup, None)
    cpu, wall = timer.cpu[timed], timer.wall[timed]
    timed_tokens = sum(tokens[args.batch * args.warmup : args.batch * total_steps])
    # the median step (robust to one step slowed by the machine's other load) times the number of steps
    per_step_cpu, per_step_wall = statistics.median(cpu) * len(cpu), statistics.median(wall) * len(wall)
    return {"impl": args.impl, "mode": args.mode, "ratio": args.ratio, "vocab": args.vocab,
            "cpu_seconds": sum(cpu), "wall_seconds": sum(wall), "step_cpu_seconds": cpu,
            "tokens_per_cpu_s": timed_tokens / per_step_cpu, "tokens_per_s": timed_tokens / per_step_wall,
            "peak_mb": peak_mb, "memory": "cuda max allocated" if cuda else ("VmHWM" if reset else "ru_maxrss"),
            "steps": len(cpu), "gradient_checkpointing": bool(checkpointing), "tokens": timed_tokens}


def _row(by, vocab, mode, ratio):
    return {impl: by.get((vocab, mode, ratio, impl)) for impl in IMPLEMENTATIONS}


def aggregate(results) -> dict:
    """One entry per (vocab, mode, ratio, impl) over its repeats: the best tokens per CPU-second (the run least
    slowed by the machine's other load) and the median peak memory growth."""
    runs: dict = {}
    for r in results:
        runs.setdefault((r["vocab"], r["mode"], r["ratio"], r["impl"]), []).append(r)
    return {key: {**max(rs, key=lambda r: r["tokens_per_cpu_s"]), "repeats": len(rs),
                  "peak_mb": statistics.median(r["peak_mb"] for r in rs)} for key, rs in runs.items()}


def print_table(results, vocabs, modes, ratios) -> None:
    by = aggregate(results)
    rate = lambda r: "–" if r is None else f"{r['tokens_per_cpu_s']:.0f}"  # noqa: E731
    mem = lambda r: "–" if r is None else f"{r['peak_mb']:.0f}"  # noqa: E731
    ratio_of = lambda a, b, key: "–" if a is None or b is None else f"{a[key] / max(b[key], 1e-9):.2f}x"  # noqa: E731
    print("\ntokens per CPU-second (higher is better)\n")
    print("| vocab | mode | P:R | " + " | ".join(TITLES[i] for i in IMPLEMENTATIONS)
          + " | alignkit / TRL best | precomputed: alignkit / TRL |")
    print("|---" * (len(IMPLEMENTATIONS) + 5) + "|")
    for vocab in vocabs:
        for mode in modes:
            for ratio in ratios:
                r = _row(by, vocab, mode, ratio)
                print(f"| {vocab:,} | {mode} | {ratio}:1 | " + " | ".join(rate(r[i]) for i in IMPLEMENTATIONS)
                      + f" | {ratio_of(r['alignkit'], r['trl-best'], 'tokens_per_cpu_s')} | "
                      f"{ratio_of(r['alignkit-precomputed'], r['trl-best-precomputed'], 'tokens_per_cpu_s')} |")
    print("\npeak memory growth during training, MB (lower is better)\n")
    print("| vocab | mode | P:R | " + " | ".join(TITLES[i] for i in IMPLEMENTATIONS)
          + " | alignkit / TRL best | precomputed: alignkit / TRL |")
    print("|---" * (len(IMPLEMENTATIONS) + 5) + "|")
    for vocab in vocabs:
        for mode in modes:
            for ratio in ratios:
                r = _row(by, vocab, mode, ratio)
                print(f"| {vocab:,} | {mode} | {ratio}:1 | " + " | ".join(mem(r[i]) for i in IMPLEMENTATIONS)
                      + f" | {ratio_of(r['alignkit'], r['trl-best'], 'peak_mb')} | "
                      f"{ratio_of(r['alignkit-precomputed'], r['trl-best-precomputed'], 'peak_mb')} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocabs", default="450,32000,151936", help="vocabulary sizes (450: the tiny tokenizer's)")
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--ratios", default="1,4", help="prompt:response token ratios")
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2, help="pairs per step")
    parser.add_argument("--response_tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per implementation (the table keeps the best tokens/CPU-s, the median memory)")
    parser.add_argument("--json", default=None, help="write the results here (after every run)")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --json, run only the missing")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ratio", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.worker:
        import transformers

        transformers.logging.set_verbosity_error()
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    vocabs = [int(v) for v in args.vocabs.split(",")]
    modes, ratios = args.modes.split(","), [int(r) for r in args.ratios.split(",")]
    impls = [i for i in args.impls.split(",") if i]
    unknown = set(impls) - set(IMPLEMENTATIONS)
    if unknown:
        raise SystemExit(f"--impls: unknown {sorted(unknown)}; choose from {IMPLEMENTATIONS}")
    results = []
    if args.resume and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            results = json.load(f)
    done: dict = {}
    for r in results:
        key = (r["vocab"], r["mode"], r["ratio"], r["impl"])
        done[key] = done.get(key, 0) + 1
    import trl

    print(f"TRL {trl.__version__}; Qwen2 hidden 384, 6 layers, tied embeddings; {args.batch} pairs per step; "
          f"{args.warmup} warm-up + {args.steps} timed steps; response {args.response_tokens} tokens; fp32; "
          f"{args.threads} torch thread(s)", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    for vocab in vocabs:
        model = bench_model(vocab)
        for mode in modes:
            for ratio in ratios:
                # repeats rotate through the implementations, every other pass in reverse order, so that each
                # sees the machine's load at several moments
                order = [impl for rep in range(args.repeats) for impl in (impls if rep % 2 == 0 else impls[::-1])]
                for impl in order:
                    key = (vocab, mode, ratio, impl)
                    if done.get(key, 0) >= args.repeats:
                        continue
                    done[key] = done.get(key, 0) + 1
                    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--impl", impl, "--mode", mode,
                           "--ratio", str(ratio), "--vocab", str(vocab), "--model", model, "--steps", str(args.steps),
                           "--warmup", str(args.warmup), "--batch", str(args.batch),
                           "--response_tokens", str(args.response_tokens), "--threads", str(args.threads)]
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
                    if line is None:
                        print(proc.stderr[-3000:], file=sys.stderr)
                        raise SystemExit(f"worker failed: {impl} {mode} {ratio}:1 vocab {vocab}")
                    r = json.loads(line[len("RESULT ") :])
                    results.append(r)
                    print(f"  vocab {vocab:>7,} {mode:4s} {ratio}:1 {TITLES[impl]:27s} {r['tokens_per_cpu_s']:7.0f} "
                          f"tok/CPU-s {r['tokens_per_s']:7.0f} tok/s  {r['peak_mb']:7.0f} MB", flush=True)
                    if args.json:
                        with open(args.json, "w") as f:
                            json.dump(results, f, indent=2)
    print_table(results, vocabs, modes, ratios)


if __name__ == "__main__":
    main()
