"""Rollout engines: sample ``n`` completions per prompt (see :mod:`alignkit.rollout.base`).

``make_engine("hf" | "vllm" | "server", model, tokenizer, **options)`` builds one. The vLLM and
server modules are imported only when chosen, so the CPU path never imports vLLM.
"""

from alignkit.rollout.base import Completion, RolloutEngine, SamplingConfig

BACKENDS = ("hf", "vllm", "server")


def make_engine(backend: str, model=None, tokenizer=None, **options) -> RolloutEngine:
    """A rollout engine.

    * ``hf``: ``HFEngine(model, tokenizer, batch_size=None, progress=True)`` (``None``: the batch is chosen from memory);
    * ``vllm``: ``VLLMEngine(model_path, tokenizer, ...)``, colocated with training (GPU); ``model``
      may be the path or the model being trained (its ``name_or_path`` is used);
    * ``server``: ``ServerEngine(base_url, tokenizer, ...)`` against ``vllm serve`` / ``alignkit serve``.
    """
    if backend == "hf":
        from alignkit.rollout.hf import HFEngine

        return HFEngine(model, tokenizer, **options)
    if backend == "vllm":
        from alignkit.rollout.vllm import VLLMEngine

        return VLLMEngine.from_model(model, tokenizer, **options)
    if backend == "server":
        from alignkit.rollout.server import ServerEngine

        return ServerEngine(tokenizer=tokenizer, **options)
    raise ValueError(f"unknown rollout backend {backend!r}; choose one of {BACKENDS}")


__all__ = ["BACKENDS", "Completion", "RolloutEngine", "SamplingConfig", "make_engine"]
