"""alignkit DPOTrainer vs trl.DPOTrainer: throughput and peak memory on the same model, data and batch.

    python benchmarks/dpo_vs_trl.py [--steps 10] [--warmup 3] [--batch 8]

Model: a Qwen2 of ~14M parameters built offline (hidden 384, 6 layers, the tiny tokenizer).
Data: synthetic preference pairs whose prompt:response token lengths are 1:1 or 4:1.
For each setting (full fine-tuning with a frozen reference copy, and LoRA with the adapter-disabled
reference) it trains each implementation for ``warmup + steps`` optimizer steps in a fresh
subprocess and reports

* tokens/s: tokens of (prompt + chosen) + (prompt + rejected) per pair, the same count for every
  implementation, divided by the wall time of the timed steps;
* peak memory: CUDA max allocated on a GPU; on CPU the growth of the process's peak RSS from just
  before training to the end (model and data loading excluded).

alignkit runs twice: with the default shared-prompt layout and with the padded layout (the
prompt repeated per response, as TRL does), to separate the layout's effect from the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

IMPLEMENTATIONS = ("trl", "alignkit-padded", "alignkit-shared")


def _pairs(tokenizer, n: int, prompt_tokens: int, response_tokens: int, seed: int = 0):
    """Preference pairs whose prompt and responses are about the given token lengths."""
    from alignkit.tasks.arithmetic import make_preference_pairs

    pool = make_preference_pairs(4 * n + 64, seed=seed)

    def fill(texts, target):
        out, k = "", 0
        while len(tokenizer(out).input_ids) < target:
            out += texts[k % len(texts)] + "\n"
            k += 1
        ids = tokenizer(out).input_ids[:target]
        return tokenizer.decode(ids)

    pairs = []
    for i in range(n):
        a, b = pool[2 * i], pool[2 * i + 1]
        prompt = fill([a["prompt"], b["prompt"]], prompt_tokens)
        chosen = fill([a["chosen"], b["chosen"]], response_tokens)
        rejected = fill([a["rejected"], b["rejected"]], response_tokens)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def _pair_tokens(tokenizer, pairs) -> list[int]:
    out = []
    for p in pairs:
        n_prompt = len(tokenizer(p["prompt"]).input_ids)
        out.append(2 * n_prompt + len(tokenizer(p["chosen"]).input_ids) + len(tokenizer(p["rejected"]).input_ids))
    return out


def worker(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    total_steps = args.warmup + args.steps
    n = args.batch * total_steps
    prompt_len = args.response_tokens * args.ratio
    pairs = _pairs(tokenizer, n, prompt_len, args.response_tokens)
    tokens = _pair_tokens(tokenizer, pairs)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    peft_config = None
    if args.mode == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")

    class Timer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    timer = Timer()
    common = dict(output_dir=tempfile.mkdtemp(), max_steps=total_steps, per_device_train_batch_size=args.batch,
                  learning_rate=1e-5, report_to="none", save_strategy="no", logging_steps=10_000, seed=0,
                  use_cpu=not torch.cuda.is_available(), max_length=None, disable_tqdm=True,
                  train_sampling_strategy="sequential", bf16=False, dataloader_num_workers=0)
    if args.impl == "trl":
        import trl
        from datasets import Dataset

        config = trl.DPOConfig(loss_type=["sigmoid"], beta=0.1, **common)
        trainer = trl.DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(pairs),
                                 processing_class=tokenizer, peft_config=peft_config, callbacks=[timer])
    else:
        from alignkit.trainers import DPOConfig, DPOTrainer

        layout = "padded" if args.impl == "alignkit-padded" else "shared_prompt"
        config = DPOConfig(beta=0.1, score_layout=layout, **common)
        trainer = DPOTrainer(model=model, args=config, train_dataset=pairs, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[timer])

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainer.train()
    if torch.cuda.is_available():
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    timed = timer.times[args.warmup :]
    timed_tokens = sum(tokens[args.batch * args.warmup : args.batch * total_steps])
    return {"impl": args.impl, "mode": args.mode, "ratio": args.ratio, "seconds": sum(timed),
            "tokens_per_s": timed_tokens / sum(timed), "peak_mb": peak_mb, "steps": len(timed)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--response_tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--ratios", default="1,4")
    parser.add_argument("--model", default=None, help="model dir (default: build the ~14M benchmark model)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ratio", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    if args.model is None:
        from alignkit.modeling import make_tiny_model

        args.model = make_tiny_model(os.path.join(tempfile.gettempdir(), "alignkit-bench-qwen2-14m"), "qwen2",
                                     hidden_size=384, num_layers=6)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(args.model)
    n_params = (cfg.vocab_size * cfg.hidden_size + cfg.num_hidden_layers * (
        2 * cfg.hidden_size * cfg.hidden_size + 2 * cfg.hidden_size * cfg.hidden_size * cfg.num_key_value_heads
        // cfg.num_attention_heads + 3 * cfg.hidden_size * cfg.intermediate_size))
    print(f"model: Qwen2 ~{n_params / 1e6:.1f}M params (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
          f"vocab {cfg.vocab_size}); batch {args.batch} pairs; {args.warmup} warm-up + {args.steps} timed steps; "
          f"response {args.response_tokens} tokens; fp32; {args.threads} threads", flush=True)

    results = []
    for mode in args.modes.split(","):
        for ratio in [int(r) for r in args.ratios.split(",")]:
            for impl in IMPLEMENTATIONS:
                cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--mode", mode, "--ratio", str(ratio),
                       "--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--batch", str(args.batch), "--response_tokens", str(args.response_tokens),
                       "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
                if line is None:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"worker failed: {impl} {mode} {ratio}")
                results.append(json.loads(line[len("RESULT ") :]))
                r = results[-1]
                print(f"  {mode:4s} {ratio}:1 {impl:16s} {r['tokens_per_s']:9.0f} tok/s  {r['peak_mb']:7.1f} MB",
                      flush=True)

    print()
    header = ("| mode | prompt:response | TRL tok/s | alignkit padded tok/s | alignkit shared tok/s | "
              "speed-up padded | speed-up shared | TRL peak MB | alignkit shared peak MB | memory ratio |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    by = {(r["mode"], r["ratio"], r["impl"]): r for r in results}
    for mode in args.modes.split(","):
        for ratio in [int(r) for r in args.ratios.split(",")]:
            t, p, s = (by[(mode, ratio, i)] for i in IMPLEMENTATIONS)
            print(f"| {mode} | {ratio}:1 | {t['tokens_per_s']:.0f} | {p['tokens_per_s']:.0f} | {s['tokens_per_s']:.0f} | "
                  f"{p['tokens_per_s'] / t['tokens_per_s']:.2f}x | {s['tokens_per_s'] / t['tokens_per_s']:.2f}x | "
                  f"{t['peak_mb']:.0f} | {s['peak_mb']:.0f} | {s['peak_mb'] / max(t['peak_mb'], 1e-9):.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
