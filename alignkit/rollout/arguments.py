"""``RolloutArguments``: the sampling and verification half of a recipe (parsed next to the config).

Every recipe accepts these keys; the methods that sample (on-policy DPO, D²O reference samples,
per-step values) read them, the others ignore them. They map onto :class:`SamplingConfig`,
:func:`alignkit.rollout.make_engine` and :func:`alignkit.verifiers.get_verifier`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alignkit.rollout.base import SamplingConfig


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
    vllm_enable_sleep: bool = field(default=True, metadata={"help": "vllm: free the KV cache while training."})
    server_base_url: str = field(default="http://localhost:8000", metadata={"help": "server: vLLM server URL."})
    server_adapter_dir: str | None = field(default=None, metadata={"help": "server: directory the server reads adapters from."})
    server_timeout: float = 600.0
    verifier: str = field(default="math", metadata={"help": "math, code, match, or a registered custom verifier."})
    verifier_timeout: float = field(default=5.0, metadata={"help": "Seconds per verification call."})
    verifier_num_workers: int | None = field(default=None, metadata={"help": "Verification processes; default: CPU count."})

    def sampling(self, seed: int | None = None) -> SamplingConfig:
        return SamplingConfig(
            temperature=self.rollout_temperature,
            top_p=self.rollout_top_p,
            top_k=self.rollout_top_k,
            max_new_tokens=self.rollout_max_new_tokens,
            stop=list(self.rollout_stop or []),
            seed=self.rollout_seed if seed is None else seed,
        )

    def engine(self, model, tokenizer):
        """The rollout engine these arguments describe, sampling from ``model``."""
        from alignkit.rollout import make_engine

        if self.rollout_backend == "hf":
            return make_engine("hf", model, tokenizer, batch_size=self.rollout_batch_size)
        if self.rollout_backend == "vllm":
            return make_engine(
                "vllm", model, tokenizer,
                gpu_memory_utilization=self.vllm_gpu_memory_utilization,
                tensor_parallel_size=self.vllm_tensor_parallel_size,
                max_model_len=self.vllm_max_model_len,
                enable_sleep=self.vllm_enable_sleep,
            )
        if self.rollout_backend == "server":
            return make_engine(
                "server", model, tokenizer,
                base_url=self.server_base_url, adapter_dir=self.server_adapter_dir, timeout=self.server_timeout,
            )
        from alignkit.rollout import BACKENDS

        raise ValueError(f"unknown rollout_backend {self.rollout_backend!r}; choose one of {BACKENDS}")

    def make_verifier(self):
        from alignkit.verifiers import get_verifier

        return get_verifier(self.verifier, timeout=self.verifier_timeout, num_workers=self.verifier_num_workers)
