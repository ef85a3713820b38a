"""The output head over scored rows, in tiles: log-probs, KL and argmax without an [N, vocab] table.

A language model's head maps N hidden states to N × V logits; at V = 151,936 and N = 512 response tokens
that table is 311 MB in fp32, and autograd keeps several copies of it for backward. Here the head is
applied tile by tile, inside custom autograd functions that keep only per-row numbers:

* :func:`token_log_probs`: log softmax(head(h))[y] per row. The forward runs a streaming (online)
  log-sum-exp over the tiles and keeps the N log-sum-exps; the backward recomputes each tile's logits
  and softmax and pushes ``g·(onehot(y) − softmax)`` through the head.
* :func:`token_kl`: KL(p_ref ‖ softmax(head(h))) per row (NPO+KL, the compatibility term), with the
  reference's logits supplied tile by tile; the forward streams both log-sum-exps and Σ p_ref·(z_ref − z),
  the backward pushes ``g·(softmax(z) − p_ref)``.
* :func:`greedy_tokens`: the argmax per row.

Tiles. A plain ``nn.Linear`` head (tied or not, with or without bias) is cut along both axes: row blocks of
up to ``ROW_BLOCK`` rows and vocabulary blocks of budget // rows columns, so the matrix products keep many
rows (fast) and the weight's gradient is written once per block. Any other head module (LoRA on the head,
quantised heads) is called whole on blocks of budget // V rows. The budget is ``CHUNK_ELEMENTS`` logits
per tile on CPU (8 MiB in fp32), ``CHUNK_ELEMENTS_ACCELERATOR`` on a GPU. Either way the live logits are
a few tiles, independent of the vocabulary size beyond one tile. The cost: a trained head does one more
head product than a full table (the recomputation in backward); a frozen linear head (LoRA) does none,
its gradient w.r.t. the hidden states being contracted in the forward (see :class:`_TokenLogProbs`).

This is the streaming-softmax idea of "Online normalizer calculation for softmax" (Milakov & Gimelshein
2018) applied to the loss, as in Liger Kernel's fused linear cross-entropy (Hsu et al. 2024,
arXiv:2410.10989) and TRL's chunked log-prob head (``trl/kernels/chunked_logprob.py``); unlike those it
returns per-token values whose gradient is not known in the forward, hence the recomputation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from torch.utils.weak import WeakIdKeyDictionary

# Logits entries per tile: on CPU 2**21 fp32 values (8 MiB; larger tiles are no faster there and leave more
# freed memory resident), on an accelerator 2**26 (256 MiB; fewer, larger kernels).
CHUNK_ELEMENTS = 1 << 21
CHUNK_ELEMENTS_ACCELERATOR = 1 << 26
# Most rows per tile of a linear head, and the fewest vocabulary columns a tile should have (its vocabulary
# blocks are budget // rows columns wide).
ROW_BLOCK = 4096
MIN_COLUMNS = 1024


_UNWRAPPED = WeakIdKeyDictionary()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """``accelerate.utils.extract_model_from_parallel(model)`` (the model inside DDP / FSDP / DeepSpeed / compile
    wrappers), remembered per wrapper object: the lookup costs about a millisecond and scoring asks several
    times per call."""
    inner = _UNWRAPPED.get(model)
    if inner is None:
        inner = _UNWRAPPED[model] = extract_model_from_parallel(model)
    return inner


def _budget(device: torch.device | None) -> int:
    return CHUNK_ELEMENTS if device is None or device.type == "cpu" else CHUNK_ELEMENTS_ACCELERATOR


def post_head_transform(config) -> tuple[float, float | None]:
    """(logit scale, soft-cap) a model applies after its output projection, read from its config (the list of
    TRL's fused head, ``trl.trainer.utils.add_fused_lm_head``): Gemma's ``final_logit_softcapping``, Cohere's
    ``logit_scale``, ``output_multiplier``, Falcon-H1's ``lm_head_multiplier``, Granite / MiniCPM3's
    1 / ``logits_scaling`` (HyperCLOVA X multiplies by it)."""
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = config.logits_scaling if config.model_type == "hyperclovax" else 1.0 / config.logits_scaling
    return (1.0 if scale is None else float(scale)), getattr(config, "final_logit_softcapping", None)


class OutputHead:
    """A model's output head as a function of hidden-state rows: [n, hidden] -> fp32 [n, vocab] logits.

    The output-embedding module itself (plain, tied, LoRA-wrapped or quantised), then the model's post-head
    transform (:func:`post_head_transform`), then division by ``temperature``.
    """

    def __init__(self, module: torch.nn.Module, *, vocab_size: int | None = None, logit_scale: float = 1.0,
                 softcap: float | None = None, temperature: float = 1.0):
        self.module = module
        self.logit_scale, self.softcap, self.temperature = float(logit_scale), softcap, float(temperature)
        self.vocab_size = vocab_size or getattr(module, "out_features", None)
        if not self.vocab_size:
            raise ValueError(f"cannot tell the vocabulary size of the output head {type(module).__name__}")
        weight = getattr(module, "weight", None)
        # a plain Linear with its full weight here (not a ZeRO-3 partition or an FSDP shard): cut into vocab blocks
        self.linear = (type(module) is torch.nn.Linear and type(weight) in (torch.Tensor, torch.nn.Parameter)
                       and tuple(weight.shape) == (self.vocab_size, module.in_features))
        # a PEFT-wrapped head (LoRA on lm_head, modules_to_save) computes differently inside disable_adapter():
        # its logits cannot be recomputed later, outside the context they were scored in
        self.context_dependent = any(type(m).__module__.split(".")[0] == "peft" for m in module.modules())

    @property
    def contractible(self) -> bool:
        """d logits / d hidden is a constant times the weight (linear, no soft-cap)."""
        return self.linear and not self.softcap

    @property
    def slope(self) -> float:
        return self.logit_scale / self.temperature

    def weight_rows(self, v0: int, v1: int) -> torch.Tensor:
        return self.module.weight[v0:v1].detach()

    @classmethod
    def of_model(cls, model: torch.nn.Module, temperature: float = 1.0) -> "OutputHead":
        """The head of a (possibly wrapped: DDP, PEFT ...) causal LM, with its config's post-head transform."""
        inner = unwrap(model)
        module = inner.get_output_embeddings()
        if module is None:
            raise ValueError(f"{type(inner).__name__} has no output embeddings (get_output_embeddings() is None)")
        config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
        scale, softcap = post_head_transform(config)
        return cls(module, vocab_size=getattr(module, "out_features", None) or config.vocab_size, logit_scale=scale,
                   softcap=softcap, temperature=temperature)

    def transform(self, logits: torch.Tensor) -> torch.Tensor:
        z = logits.float()
        if self.logit_scale != 1.0:
            z = z * self.logit_scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        if self.temperature != 1.0:
            z = z / self.temperature
        return z

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.transform(self.module(hidden))

    # ---- the tile interface used by the autograd functions (also implemented by _LogitsTable)

    def parameters(self) -> list[torch.Tensor]:
        """The tensors the head uses that need a gradient, in the order the functions return their grads."""
        if self.linear:
            return [t for t in (self.module.weight, self.module.bias) if t is not None and t.requires_grad]
        return [p for p in self.module.parameters() if p.requires_grad]

    def blocks(self, n_rows: int, tables: int = 1, device: torch.device | None = None) -> tuple[int, int]:
        """(rows, vocabulary columns) per tile, so that ``tables`` live tiles hold the device's tile budget."""
        budget = max(1, _budget(device) // tables)
        if not self.linear:
            return max(1, budget // self.vocab_size), self.vocab_size
        rows = max(1, min(n_rows, ROW_BLOCK, budget // MIN_COLUMNS))
        return rows, max(1, min(self.vocab_size, budget // rows))

    def tile(self, hidden: torch.Tensor, r0: int, r1: int, v0: int, v1: int) -> torch.Tensor:
        """fp32 logits of rows [r0, r1) and vocabulary [v0, v1), without gradient."""
        with torch.no_grad():
            if not self.linear:
                return self(hidden[r0:r1])[:, v0:v1]
            bias = None if self.module.bias is None else self.module.bias[v0:v1]
            return self.transform(F.linear(hidden[r0:r1], self.module.weight[v0:v1], bias))

    def tile_backward(self, hidden, r0, r1, v0, v1, cotangent, grad_hidden, grads) -> None:
        """Add the tile's vector-Jacobian product with ``cotangent`` ([r1 - r0, v1 - v0], d loss / d logits) to
        ``grad_hidden`` (rows [r0, r1), when not None) and to ``grads`` (fp32 buffers of :meth:`parameters`)."""
        params = self.parameters()
        with torch.enable_grad():
            h = hidden[r0:r1].detach().requires_grad_(grad_hidden is not None)
            if self.linear:
                weight, bias = self.module.weight, self.module.bias
                leaves = [t[v0:v1].detach().requires_grad_(t.requires_grad) if t is not None else None
                          for t in (weight, bias)]
                z = self.transform(F.linear(h, leaves[0], leaves[1]))
                targets = [(leaf, p, slice(v0, v1)) for leaf, p in zip(leaves, (weight, bias))
                           if p is not None and p.requires_grad]
            else:
                z = self(h)
                targets = [(p, p, slice(None)) for p in params]
        inputs = ([h] if grad_hidden is not None else []) + [leaf for leaf, _, _ in targets]
        if not inputs:
            return
        out = torch.autograd.grad(z, inputs, cotangent, allow_unused=True)
        if grad_hidden is not None:
            grad_hidden[r0:r1] += out[0]
            out = out[1:]
        index = {id(p): i for i, p in enumerate(params)}
        for (_, p, where), g in zip(targets, out):
            if g is not None:
                grads[index[id(p)]][where] += g


class _LogitsTable:
    """The tile interface over a given [N, V] logits tensor (its "hidden" rows are the logits themselves)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def parameters(self) -> list[torch.Tensor]:
        return []

    def blocks(self, n_rows: int, tables: int = 1, device: torch.device | None = None) -> tuple[int, int]:
        budget = max(1, _budget(device) // tables)
        rows = max(1, min(n_rows, ROW_BLOCK, budget // MIN_COLUMNS))
        return rows, max(1, min(self.vocab_size, budget // rows))

    def tile(self, logits, r0, r1, v0, v1):
        return logits[r0:r1, v0:v1].detach().to(torch.float32, copy=True)

    def tile_backward(self, logits, r0, r1, v0, v1, cotangent, grad_logits, grads) -> None:
        if grad_logits is not None:
            grad_logits[r0:r1, v0:v1] += cotangent.to(grad_logits.dtype)


def _tiles(n: int, v: int, blocks: tuple[int, int]):
    rows, cols = blocks
    for r0 in range(0, n, rows):
        yield r0, min(n, r0 + rows), [(v0, min(v, v0 + cols)) for v0 in range(0, v, cols)]


def _grad_buffers(params, wanted):
    return [torch.zeros_like(p, dtype=torch.float32) if w else None for p, w in zip(params, wanted)]


def _param_grads(params, buffers):
    return [None if b is None else b.to(p.dtype) for p, b in zip(params, buffers)]


class _TokenLogProbs(torch.autograd.Function):
    """log softmax(head(hidden))[target] per row, tile by tile, recomputing the tiles in backward.

    A frozen linear head without soft-cap (LoRA) instead contracts the gradient in the forward: with
    z = c·W h, d log p[t] / d h = c·(W[t] − Σ_v softmax(z)_v W_v), and Σ_v exp(z_v − m) W_v streams over
    the tiles like the normaliser (rescaled when the running max m moves). The forward then costs two
    products per tile, the backward none.
    """

    @staticmethod
    def forward(ctx, hidden, targets, head, blocks, *params):
        n, vocab = hidden.size(0), head.vocab_size
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        picked = torch.empty(n, dtype=torch.float32, device=hidden.device)
        contract = getattr(head, "contractible", False) and ctx.needs_input_grad[0] and not any(ctx.needs_input_grad[4:])
        local = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if contract else None
        for r0, r1, columns in _tiles(n, vocab, blocks):
            t = targets[r0:r1]
            running_max = torch.full((r1 - r0,), float("-inf"), device=hidden.device)
            running_sum = torch.zeros(r1 - r0, device=hidden.device)
            if contract:
                weighted = torch.zeros(r1 - r0, hidden.size(1), dtype=torch.float32, device=hidden.device)
            for v0, v1 in columns:
                z = head.tile(hidden, r0, r1, v0, v1)
                new_max = torch.maximum(running_max, z.max(1).values)
                rescale = torch.exp(running_max - new_max)
                e = torch.exp(z - new_max[:, None])
                running_sum = running_sum * rescale + e.sum(1)
                if contract:  # Σ_v exp(z_v − m)·W_v
                    weighted = weighted * rescale[:, None] + e @ head.weight_rows(v0, v1).float()
                running_max = new_max
                inside = (t >= v0) & (t < v1)
                where = (t - v0).clamp(0, v1 - v0 - 1)
                picked[r0:r1] = torch.where(inside, z.gather(1, where[:, None])[:, 0], picked[r0:r1])
            lse[r0:r1] = running_max + torch.log(running_sum)
            if contract:
                local[r0:r1] = head.slope * (head.weight_rows(0, vocab).index_select(0, t).float()
                                             - weighted / running_sum[:, None])
        ctx.head, ctx.blocks, ctx.contracted, ctx.n_params = head, blocks, contract, len(params)
        if contract:
            ctx.save_for_backward(local.to(hidden.dtype))
        else:
            ctx.save_for_backward(hidden, targets, lse, *params)
        return picked - lse

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.contracted:
            (local,) = ctx.saved_tensors
            return (local * grad_out[:, None].to(local.dtype), None, None, None, *[None] * (ctx.n_params))
        hidden, targets, lse, *params = ctx.saved_tensors
        head = ctx.head
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grads = _grad_buffers(params, ctx.needs_input_grad[4:])
        for r0, r1, columns in _tiles(hidden.size(0), head.vocab_size, ctx.blocks):
            g, t, row_lse = grad_out[r0:r1].float(), targets[r0:r1], lse[r0:r1]
            for v0, v1 in columns:
                z = head.tile(hidden, r0, r1, v0, v1)
                # d (z[t] − lse) / d z = onehot(t) − softmax(z), times the incoming gradient g
                cotangent = torch.exp(z.sub_(row_lse[:, None])).mul_(-g[:, None])
                inside = (t >= v0) & (t < v1)
                local = (t - v0).clamp(0, v1 - v0 - 1)
                cotangent.scatter_add_(1, local[:, None], torch.where(inside, g, 0.0)[:, None])
                head.tile_backward(hidden, r0, r1, v0, v1, cotangent, grad_hidden, grads)
        return (grad_hidden, None, None, None, *_param_grads(params, grads))


class _TokenKL(torch.autograd.Function):
    """KL(softmax(z_ref) ‖ softmax(head(hidden))) per row, tile by tile; ``reference(r0, r1, v0, v1)`` gives
    the reference's fp32 logits of a tile (no gradient)."""

    @staticmethod
    def forward(ctx, hidden, head, reference, blocks, *params):
        n, vocab = hidden.size(0), head.vocab_size
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        ref_lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        kl = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for r0, r1, columns in _tiles(n, vocab, blocks):
            shape, device = (r1 - r0,), hidden.device
            m, s = torch.full(shape, float("-inf"), device=device), torch.zeros(shape, device=device)
            m_ref, s_ref = torch.full(shape, float("-inf"), device=device), torch.zeros(shape, device=device)
            cross = torch.zeros(shape, device=device)  # Σ exp(z_ref − m_ref)·(z_ref − z), rescaled with m_ref
            for v0, v1 in columns:
                z, z_ref = head.tile(hidden, r0, r1, v0, v1), reference(r0, r1, v0, v1)
                new_m = torch.maximum(m, z.max(1).values)
                s = s * torch.exp(m - new_m) + torch.exp(z - new_m[:, None]).sum(1)
                m = new_m
                new_m_ref = torch.maximum(m_ref, z_ref.max(1).values)
                rescale = torch.exp(m_ref - new_m_ref)
                e_ref = torch.exp(z_ref - new_m_ref[:, None])
                term = torch.where(e_ref > 0, e_ref * (z_ref - z), 0.0).sum(1)
                s_ref = s_ref * rescale + e_ref.sum(1)
                cross = cross * rescale + term
                m_ref = new_m_ref
            lse[r0:r1], ref_lse[r0:r1] = m + torch.log(s), m_ref + torch.log(s_ref)
            # Σ p_ref·(log p_ref − log q) = Σ p_ref·(z_ref − z) − lse_ref + lse
            kl[r0:r1] = cross / s_ref - ref_lse[r0:r1] + lse[r0:r1]
        ctx.head, ctx.reference, ctx.blocks = head, reference, blocks
        ctx.save_for_backward(hidden, lse, ref_lse, *params)
        return kl

    @staticmethod
    def backward(ctx, grad_out):
        hidden, lse, ref_lse, *params = ctx.saved_tensors
        head = ctx.head
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grads = _grad_buffers(params, ctx.needs_input_grad[4:])
        for r0, r1, columns in _tiles(hidden.size(0), head.vocab_size, ctx.blocks):
            g = grad_out[r0:r1].float()[:, None]
            for v0, v1 in columns:
                z = head.tile(hidden, r0, r1, v0, v1)
                p_ref = torch.exp(ctx.reference(r0, r1, v0, v1) - ref_lse[r0:r1, None])
                # d KL / d z = softmax(z) − p_ref, times the incoming gradient g
                cotangent = torch.exp(z.sub_(lse[r0:r1, None])).sub_(p_ref).mul_(g)
                head.tile_backward(hidden, r0, r1, v0, v1, cotangent, grad_hidden, grads)
        return (grad_hidden, None, None, None, *_param_grads(params, grads))


def _check_targets(targets: torch.Tensor, vocab_size: int) -> None:
    if targets.numel() and not (0 <= int(targets.min()) and int(targets.max()) < vocab_size):
        raise ValueError(f"target token ids must lie in [0, {vocab_size}) (the head's vocabulary), got "
                         f"[{int(targets.min())}, {int(targets.max())}]")


def token_log_probs(head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N] log softmax(head(hidden))[target], never holding more than a few tiles of logits (forward or
    backward). Values and gradients (w.r.t. ``hidden`` and the head's parameters) equal
    ``torch.log_softmax(head(hidden), -1).gather(-1, targets[:, None])`` up to float rounding."""
    _check_targets(targets, head.vocab_size)
    blocks = head.blocks(hidden.size(0), tables=2, device=hidden.device)
    return _TokenLogProbs.apply(hidden, targets, head, blocks, *head.parameters())


def selective_log_softmax(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row of an [N, V] logits tensor, tile by tile: neither the log-softmax nor
    (in backward) the softmax is built for more than a tile (the gradient w.r.t. ``logits`` is [N, V] itself)."""
    table = _LogitsTable(logits.size(-1))
    _check_targets(targets, table.vocab_size)
    return _TokenLogProbs.apply(logits, targets, table, table.blocks(logits.size(0), tables=2, device=logits.device))


def token_kl(head: OutputHead, hidden: torch.Tensor, reference, *, reference_sliceable: bool = True) -> torch.Tensor:
    """[N] KL(softmax(z_ref) ‖ softmax(head(hidden))) per row, with ``reference(r0, r1, v0, v1)`` giving the
    reference's fp32 logits of a tile. The gradient flows into ``hidden`` and the head's parameters only.
    ``reference_sliceable=False``: the reference computes whole rows, so tiles span the whole vocabulary."""
    blocks = head.blocks(hidden.size(0), tables=4, device=hidden.device)
    if not reference_sliceable and blocks[1] < head.vocab_size:
        blocks = (max(1, _budget(hidden.device) // (4 * head.vocab_size)), head.vocab_size)
    return _TokenKL.apply(hidden, head, reference, blocks, *head.parameters())


def greedy_tokens(head: OutputHead, hidden: torch.Tensor) -> torch.Tensor:
    """[N] argmax of head(hidden) per row, tile by tile."""
    n = hidden.size(0)
    best = torch.zeros(n, dtype=torch.long, device=hidden.device)
    for r0, r1, columns in _tiles(n, head.vocab_size, head.blocks(n, device=hidden.device)):
        top = torch.full((r1 - r0,), float("-inf"), device=hidden.device)
        for v0, v1 in columns:
            values, index = head.tile(hidden, r0, r1, v0, v1).max(1)
            better = values > top
            top = torch.where(better, values, top)
            best[r0:r1] = torch.where(better, index + v0, best[r0:r1])
    return best
