"""One D²O training step in each scoring layout: naive (padded), shared-prompt, prompt-KV reuse and auto.

    python benchmarks/d2o_step.py [--k 8] [--shapes 64:64,128:128,256:256,256:64] [--steps 3] [--warmup 1]
                                  [--batch 4] [--threads 1]

A D²O group is K sampled responses + the labelled negative (K + 1 = 9 responses for K = 8) for one prompt.
Every layout runs the same ``D2OTrainer.compute_batch_loss`` on the same model, records and batches
(:mod:`alignkit.data.collate`):

* ``naive`` (``padded``): K + 1 rows ``prompt + response_j``, the prompt forwarded K + 1 times per group,
  what a trainer that concatenates the prompt with every response does;
* ``shared`` (``shared_prompt``): one row ``prompt, response_1, ..., response_{K+1}`` with a block attention
  mask, the prompt forwarded once per group but dense attention over the whole packed row;
* ``prompt_kv``: the prompts forwarded once with a KV cache, the K + 1 responses as a batch against it
  (the cache stays in the autograd graph, so the prompt tokens get their gradient);
* ``auto`` (the default ``score_layout``): per batch, the layout the cost model of
  :func:`alignkit.data.collate.layout_costs` rates cheapest for this model (the rule is stated in
  :mod:`alignkit.data.collate`; the table shows which one it chose).

A step is: collate, the reference pass (frozen copy, no gradient), the policy forward, backward and an
AdamW update. The layouts rotate step by step in one process (the order shifts every step), so a busy
machine slows all alike; the table gives CPU seconds per step (median; ``time.process_time``, which the
load of other processes does not inflate the way it does wall time), tokens per CPU-second with tokens
counted the same way for every layout (the naive count, (K + 1)·(P + R) per group, so the rates compare the
same work), the speed-up over naive, and memory: on a GPU the peak allocated during the step, on CPU the
bytes of the tensors autograd saves for backward (the activation memory, exact and independent of the
allocator). All layouts give the same log-probs (checked, up to float rounding). Model: a ~14M-parameter Qwen2 (hidden 384,
6 layers) built offline; fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from contextlib import contextmanager

LAYOUTS = ("padded", "shared_prompt", "prompt_kv", "auto")
NAMES = {"padded": "naive", "shared_prompt": "shared", "prompt_kv": "prompt_kv", "auto": "auto"}


def _text_of_tokens(tokenizer, pool: list[str], target: int, offset: int) -> str:
    """Text of about ``target`` tokens made of the pool's sentences, starting at ``offset``."""
    out, k = "", offset
    while len(tokenizer(out).input_ids) < target:
        out += pool[k % len(pool)] + " "
        k += 1
    return tokenizer.decode(tokenizer(out).input_ids[:target]).strip()


def make_records(tokenizer, n: int, k: int, prompt_tokens: int, response_tokens: int) -> list[dict]:
    """Negatives records with K precomputed samples, of about the given token lengths."""
    from alignkit.tasks.arithmetic import make_preference_pairs

    pairs = make_preference_pairs(64)
    pool = [p["prompt"] for p in pairs] + [p["chosen"].replace("\n", " ") for p in pairs]
    return [{
        "prompt": _text_of_tokens(tokenizer, pool, prompt_tokens, 7 * i),
        "rejected": _text_of_tokens(tokenizer, pool, response_tokens, 7 * i + 3),
        "samples": [_text_of_tokens(tokenizer, pool, response_tokens, 7 * i + 5 + j) for j in range(k)],
    } for i in range(n)]


@contextmanager
def saved_tensor_bytes(counter: list[int]):
    """Add the bytes of every tensor autograd saves for backward to ``counter[0]``."""
    import torch

    def pack(t):
        counter[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def run_shape(args, model, ref_model, tokenizer, prompt_tokens: int, response_tokens: int) -> dict:
    import torch

    from alignkit.data.collate import GroupCollator
    from alignkit.scoring import score_responses, scoring_layout
    from alignkit.trainers.d2o import D2OConfig, D2OTrainer

    cuda = torch.cuda.is_available()
    total = args.warmup + args.steps
    records = make_records(tokenizer, args.batch * total, args.k, prompt_tokens, response_tokens)
    config = D2OConfig(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=not cuda, max_length=None,
                       num_samples=args.k, reference="model", disable_tqdm=True)
    trainer = D2OTrainer(model=model, ref_model=ref_model, args=config, train_dataset=records,
                         processing_class=tokenizer)
    groups = [trainer.train_dataset[i] for i in range(len(records))]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    collators = {layout: GroupCollator(tokenizer.pad_token_id, layout) for layout in LAYOUTS}
    first = groups[: args.batch]
    model.train()
    chosen = scoring_layout(model, collators["auto"](first))  # what the policy pass of an auto batch runs
    with torch.no_grad():  # same weights, same groups: every layout must give the same log-probs
        check = [score_responses(model, trainer._prepare_inputs(collators[layout](first))).logps for layout in LAYOUTS]
    cpu = {layout: [] for layout in LAYOUTS}
    wall = {layout: [] for layout in LAYOUTS}
    memory = {layout: 0.0 for layout in LAYOUTS}
    tokens = []
    model.train()
    for step in range(total):
        examples = groups[step * args.batch : (step + 1) * args.batch]
        tokens.append(sum((args.k + 1) * len(g["prompt_ids"]) + sum(len(r) for r in g["response_ids"]) for g in examples))
        shift = step % len(LAYOUTS)
        for layout in LAYOUTS[shift:] + LAYOUTS[:shift]:
            saved = [0]
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            batch = trainer._prepare_inputs(collators[layout](examples))
            with saved_tensor_bytes(saved):
                loss, _ = trainer.compute_batch_loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if step >= args.warmup:
                cpu[layout].append(time.process_time() - start_cpu)
                wall[layout].append(time.perf_counter() - start_wall)
                used = (torch.cuda.max_memory_allocated() - base) if cuda else saved[0]
                memory[layout] = max(memory[layout], used / 2**20)
    timed_tokens = sum(tokens[args.warmup :])
    out = {"prompt_tokens": prompt_tokens, "response_tokens": response_tokens, "auto_chose": chosen,
           "memory_kind": "cuda peak" if cuda else "saved activations",
           "max_logp_gap": max(float((c - check[0]).abs().max()) for c in check)}
    for layout in LAYOUTS:
        out[layout] = {"cpu_s_per_step": statistics.median(cpu[layout]), "wall_s_per_step": statistics.median(wall[layout]),
                       "tokens_per_cpu_s": timed_tokens / sum(cpu[layout]), "memory_mb": memory[layout]}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=8, help="samples per prompt (groups hold K + 1 responses)")
    parser.add_argument("--shapes", default="64:64,128:128,256:256,256:64", help="prompt:response token lengths")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1, help="prompts (groups) per step (K + 1 responses each)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=None, help="model dir (default: build the ~14M benchmark model)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    if args.model is None:
        from alignkit.modeling import make_tiny_model

        args.model = make_tiny_model(os.path.join(tempfile.gettempdir(), "alignkit-bench-qwen2-14m"), "qwen2",
                                     hidden_size=384, num_layers=6)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").to(device)
    ref_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    ref_model = ref_model.to(device).eval().requires_grad_(False)
    print(f"D2O step, K = {args.k} ({args.k + 1} responses per group), {args.batch} groups per step, "
          f"{args.warmup} warm-up + {args.steps} timed steps per layout (rotating), fp32, {device}"
          + ("" if device == "cuda" else f", {args.threads} thread(s)"), flush=True)
    results = []
    for shape in args.shapes.split(","):
        prompt_tokens, response_tokens = (int(x) for x in shape.split(":"))
        r = run_shape(args, model, ref_model, tokenizer, prompt_tokens, response_tokens)
        results.append(r)
        print(f"  {shape}: " + "  ".join(f"{NAMES[l]} {r[l]['cpu_s_per_step']:.2f}" for l in LAYOUTS)
              + f" CPU s/step; auto chose {r['auto_chose']}; max |log π(y|x) gap| {r['max_logp_gap']:.1e}", flush=True)

    mem = results[0]["memory_kind"]
    print()
    header = ("| P:R | naive CPU s/step | shared | prompt_kv | auto (chose) | shared vs naive | prompt_kv vs naive | "
              f"auto vs naive | auto tok/CPU-s | naive {mem} MB | auto {mem} MB |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for r in results:
        naive = r["padded"]["cpu_s_per_step"]
        print(f"| {r['prompt_tokens']}:{r['response_tokens']} | {naive:.2f} | {r['shared_prompt']['cpu_s_per_step']:.2f} | "
              f"{r['prompt_kv']['cpu_s_per_step']:.2f} | {r['auto']['cpu_s_per_step']:.2f} ({r['auto_chose']}) | "
              f"{naive / r['shared_prompt']['cpu_s_per_step']:.2f}x | {naive / r['prompt_kv']['cpu_s_per_step']:.2f}x | "
              f"{naive / r['auto']['cpu_s_per_step']:.2f}x | {r['auto']['tokens_per_cpu_s']:.0f} | "
              f"{r['padded']['memory_mb']:.0f} | {r['auto']['memory_mb']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
