"""``alignkit serve``: start a vLLM OpenAI-compatible server for the ``server`` rollout backend.

    alignkit serve --model PATH [--port 8000] [--enable_lora] [--gpu_memory_utilization 0.9] [-- VLLM ARGS]

Builds the ``vllm serve`` command line and replaces this process with it (``--dry_run`` prints it).
With ``--enable_lora`` the server gets ``--enable-lora --max-lora-rank R`` and the environment variable
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, which turns on ``/v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` (what :meth:`ServerEngine.sync_weights` calls). Arguments after ``--`` go
to ``vllm serve`` unchanged (see ``vllm serve --help``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import shutil
import sys

LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alignkit serve",
        description="Start a vLLM OpenAI-compatible server (GPU). Arguments after -- go to `vllm serve`.",
    )
    p.add_argument("--model", required=True, help="model path, hub id or tiny:qwen2 (for LoRA: the base model)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served_model_name", help="name clients use as `model` (default: the model path)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--gpu_memory_utilization", type=float, default=0.9)
    p.add_argument("--tensor_parallel_size", type=int, default=1)
    p.add_argument("--max_model_len", type=int)
    p.add_argument("--enable_lora", action="store_true", help="serve LoRA adapters loaded at runtime")
    p.add_argument("--max_lora_rank", type=int, default=64, help="largest adapter rank (vLLM: 8, 16, 32, 64, ...)")
    p.add_argument("--max_loras", type=int, default=2, help="adapters in one batch (old + new while syncing)")
    p.add_argument("--seed", type=int)
    p.add_argument("--api_key", help="require this key (clients: ServerEngine(api_key=...) or $VLLM_API_KEY)")
    p.add_argument("--dry_run", action="store_true", help="print the command and exit")
    return p


def _vllm_executable() -> list[str]:
    exe = shutil.which("vllm")
    if exe:
        return [exe]
    # the console script may be missing from PATH (e.g. a venv that is not activated)
    return [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def build_command(args: argparse.Namespace, extra: list[str]) -> tuple[list[str], dict[str, str]]:
    """The ``vllm serve`` argv and the extra environment it needs."""
    model = args.model
    if model.startswith("tiny:"):
        from alignkit.modeling import resolve_model_path

        model = resolve_model_path(model)
    cmd = _vllm_executable() + [
        "serve", model,
        "--host", args.host,
        "--port", str(args.port),
        "--dtype", args.dtype,
        "--gpu-memory-utilization", str(args.gpu_memory_utilization),
        "--tensor-parallel-size", str(args.tensor_parallel_size),
    ]
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
            print("note: vllm is not installed here (pip install 'alignkit[vllm]', needs a CUDA GPU)", file=sys.stderr)
        return 0
    if not installed:
        print(
            "alignkit serve: vLLM is not installed. Install it on a machine with a CUDA GPU: "
            "pip install 'alignkit[vllm]' (or pip install 'vllm>=0.10').",
            file=sys.stderr,
        )
        return 1
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    os.execvpe(cmd[0], cmd, {**os.environ, **env})
    return 0  # not reached
