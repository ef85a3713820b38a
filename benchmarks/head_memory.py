"""Output-head memory and time: the tiled log-prob head (alignkit.output_head) vs the full-table head it replaced.

    python benchmarks/head_memory.py [--rows 512] [--hidden 384] [--vocabs 450,32000,151936] [--threads 1]

For N response rows of hidden states and a linear output head of V rows, one forward + backward of
Σ_t w_t·log softmax(head(h_t))[y_t] (random weights w, so every row gets its own gradient):

* ``full table``: logits = head(h) as an [N, V] tensor, then log-softmax-gather on it (alignkit's scorer
  before the tiled head; what a trainer that materialises the response logits does);
* ``tiled``: :func:`alignkit.output_head.token_log_probs` (tiles of up to 1,024 rows × CHUNK_ELEMENTS / (2·rows)
  vocabulary columns, a streaming log-sum-exp in forward; each tile recomputed in backward for a trained head,
  the gradient contracted in the forward for a frozen one).

Two heads: ``frozen`` (LoRA: only the hidden states need a gradient) and ``trained`` (full fine-tuning: the
head weight's gradient too). Memory is the peak of live tensor bytes allocated inside the step
(:class:`PeakTensorMemory`: exact, independent of the allocator; inputs and weights excluded, the weight's
gradient included); time is CPU seconds of the step (median of ``--repeats``).
"""

from __future__ import annotations

import argparse
import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakTensorMemory(TorchDispatchMode):
    """Live bytes of the tensor storages allocated inside the block (``live``) and their maximum (``peak``).

    Every operator output that does not alias an input (per the operator's schema) is a new storage: its
    bytes count until the storage is freed (a weakref finalizer). Views and in-place results are not counted
    twice; tensors allocated before the block are not counted at all.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for i, result in enumerate(outputs):
            if i < len(returns) and returns[i].alias_info is not None:
                continue  # a view or an in-place result: no new storage
            for leaf in tree_leaves(result):
                if isinstance(leaf, torch.Tensor):
                    storage = leaf.untyped_storage()
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def full_table_step(hidden, head, targets, w):
    logits = head(hidden).float()
    token = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    (token * w).sum().backward()


def tiled_step(hidden, head, targets, w):
    from alignkit.output_head import OutputHead, token_log_probs

    (token_log_probs(OutputHead(head), hidden, targets) * w).sum().backward()


STEPS = {"full table": full_table_step, "tiled": tiled_step}


def measure(step, rows: int, hidden_size: int, vocab: int, trained: bool, repeats: int) -> dict:
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    torch.nn.init.normal_(head.weight, std=0.02)
    head.weight.requires_grad_(trained)
    targets = torch.randint(vocab, (rows,))
    w = torch.rand(rows)
    times, peak = [], 0
    for _ in range(repeats):
        hidden = torch.randn(rows, hidden_size, requires_grad=True)
        head.weight.grad = None
        tracker = PeakTensorMemory()
        start = time.process_time()
        with tracker:
            step(hidden, head, targets, w)
        times.append(time.process_time() - start)
        peak = max(peak, tracker.peak)
    grads = (hidden.grad, head.weight.grad)
    return {"cpu_s": statistics.median(times), "peak_mb": peak / 2**20, "grads": grads}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--vocabs", default="450,32000,151936")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from alignkit.output_head import CHUNK_ELEMENTS

    print(f"{args.rows} rows, hidden {args.hidden}, fp32, {args.threads} thread(s), CHUNK_ELEMENTS = {CHUNK_ELEMENTS:,}; "
          "peak = live tensor bytes allocated in one forward + backward (weight gradient included)\n")
    print("| vocab | head | full table peak MB | tiled peak MB | full table CPU s | tiled CPU s | max abs grad diff |")
    print("|---|---|---|---|---|---|---|")
    for vocab in [int(v) for v in args.vocabs.split(",")]:
        for trained in (False, True):
            r = {name: measure(step, args.rows, args.hidden, vocab, trained, args.repeats) for name, step in STEPS.items()}
            diff = max(float((a - b).abs().max()) for a, b in zip(r["full table"]["grads"], r["tiled"]["grads"])
                       if a is not None)
            print(f"| {vocab:,} | {'trained' if trained else 'frozen (LoRA)'} | {r['full table']['peak_mb']:.0f} | "
                  f"{r['tiled']['peak_mb']:.0f} | {r['full table']['cpu_s']:.2f} | {r['tiled']['cpu_s']:.2f} | "
                  f"{diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
