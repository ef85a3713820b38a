"""``RolloutArguments``: the sampling and verification half of a recipe (parsed next to the config).

Every recipe accepts these keys; the methods that sample (on-policy DPO, D²O reference samples,
per-step values, the flip guard) read them, the others ignore them. They map onto the one sampling
settings type, :class:`~alignkit.rollout.base.SamplingConfig` (:meth:`RolloutArguments.sampling`,
range-checked when the arguments are built), the one backend dispatch,
:func:`alignkit.rollout.make_engine` (:meth:`RolloutArguments.engine_options` are its options), and
:func:`alignkit.verifiers.get_verifier`. :class:`alignkit.rollout.setup.RolloutSetup` puts them to use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alignkit.rollout import BACKENDS, make_engine
from alignkit.rollout.base import SamplingConfig
from alignkit.verifiers import get_verifier


@dataclass
class RolloutArguments:
    rollout_backend: str = field(default="hf", metadata={"help": "hf (transformers generate), vllm (colocated, GPU) or server."})
    rollout_n: int = field(default=8, metadata={"help": "Completions sampled per prompt."})
    rollout_temperature: float = 1.0
    rollout_top_p: float = 1.0
    rollout_top_k: int = 0
    rollout_max_new_tokens: int = 256
    rollout_stop: list[str] | None = field(default=None, metadata={"help": "Stop strings."})
    rollout_seed: int | None = field(default=None, metadata={"help": "Sampling seed; default: the training seed."})
    rollout_batch_size: int | None = field(
        default=None, metadata={"help": "hf backend: rows decoded together; default: chosen from memory (KV cache per token)."}
    )
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "vllm: share of GPU memory for vLLM."})
    vllm_tensor_parallel_size: int = 1
    vllm_max_model_len: int | None = None
    vllm_enable_sleep: bool = field(
        default=True, metadata={"help": "vllm: free the KV cache while training (GPU; ignored where vLLM has no sleep mode)."}
    )
    vllm_enforce_eager: bool = field(
        default=False,
        metadata={"help": "vllm: no torch.compile / CUDA graphs: the engine starts in seconds instead of minutes (CPU: "
                          "about 40 s to 2 min less), decoding may be slower on a GPU."},
    )
    vllm_kv_cache_gb: float | None = field(
        default=None,
        metadata={"help": "vllm: KV cache size in GiB (instead of vllm_gpu_memory_utilization; on CPU the way to keep "
                          "vLLM small, since the utilization there is a share of the machine's memory)."},
    )
    server_base_url: str = field(default="http://localhost:8000", metadata={"help": "server: vLLM server URL."})
    server_adapter_dir: str | None = field(default=None, metadata={"help": "server: directory the server reads adapters from."})
    server_timeout: float = 600.0
    verifier: str = field(default="math", metadata={"help": "math, code, match, or a registered custom verifier."})
    verifier_timeout: float = field(default=5.0, metadata={"help": "Seconds per verification call."})
    verifier_num_workers: int | None = field(default=None, metadata={"help": "Verification processes; default: CPU count."})

    def __post_init__(self):
        if self.rollout_backend not in BACKENDS:
            raise ValueError(f"unknown rollout_backend {self.rollout_backend!r}; choose one of {BACKENDS}")
        if self.rollout_n < 1:
            raise ValueError(f"rollout_n must be >= 1, got {self.rollout_n}")
        self.sampling()  # the range checks of SamplingConfig (temperature, top_p, max_new_tokens)

    def sampling(self, seed: int | None = None, **overrides) -> SamplingConfig:
        """The :class:`SamplingConfig` of the ``rollout_*`` keys (``seed`` overrides ``rollout_seed``;
        ``overrides`` any other setting, e.g. ``logprobs=False``)."""
        settings = dict(
            temperature=self.rollout_temperature,
            top_p=self.rollout_top_p,
            top_k=self.rollout_top_k,
            max_new_tokens=self.rollout_max_new_tokens,
            stop=list(self.rollout_stop or []),
            seed=self.rollout_seed if seed is None else seed,
        )
        return SamplingConfig(**{**settings, **overrides})

    def engine_options(self) -> dict:
        """The options :func:`alignkit.rollout.make_engine` takes for ``rollout_backend``."""
        if self.rollout_backend == "hf":
            return {"batch_size": self.rollout_batch_size}
        if self.rollout_backend == "vllm":
            return {
                "gpu_memory_utilization": self.vllm_gpu_memory_utilization,
                "tensor_parallel_size": self.vllm_tensor_parallel_size,
                "max_model_len": self.vllm_max_model_len,
                "enable_sleep": self.vllm_enable_sleep,
                "llm_kwargs": self.vllm_llm_kwargs(),
            }
        return {"base_url": self.server_base_url, "adapter_dir": self.server_adapter_dir, "timeout": self.server_timeout}

    def engine(self, model, tokenizer, **options):
        """The rollout engine these arguments describe, sampling from ``model`` (``options`` add to or
        override :meth:`engine_options`)."""
        return make_engine(self.rollout_backend, model, tokenizer, **{**self.engine_options(), **options})

    def vllm_llm_kwargs(self) -> dict:
        """Extra ``vllm.LLM`` arguments from the ``vllm_*`` fields."""
        kwargs: dict = {}
        if self.vllm_enforce_eager:
            kwargs["enforce_eager"] = True
        if self.vllm_kv_cache_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(self.vllm_kv_cache_gb * (1 << 30))
        return kwargs

    def make_verifier(self):
        return get_verifier(self.verifier, timeout=self.verifier_timeout, num_workers=self.verifier_num_workers)
