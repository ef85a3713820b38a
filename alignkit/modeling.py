"""Loading models and tokenizers, attaching LoRA / QLoRA, and building tiny offline models.

* :class:`ModelArguments` is the model half of a recipe (parsed by ``HfArgumentParser`` next to a
  trainer config), like TRL's ``ModelConfig``.
* :func:`load_model_and_tokenizer` loads from a local path or a hub id; ``tiny:qwen2`` / ``tiny:llama``
  builds (once, then caches) a small random model with a tokenizer trained offline.
* :func:`lora_config` turns the arguments into a ``peft.LoraConfig``; with ``load_in_4bit`` the base is
  quantised by bitsandbytes (QLoRA). bitsandbytes is imported by transformers only on that path.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_PREFIX = "tiny:"


@dataclass
class ModelArguments:
    """Which model to train and how to adapt it (LoRA / QLoRA)."""

    model_name_or_path: str = field(
        default="tiny:qwen2",
        metadata={"help": "Local path, hub id, or 'tiny:qwen2' / 'tiny:llama' for a small offline model."},
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


def resolve_model_path(name_or_path: str) -> str:
    """Map ``tiny:ARCH`` to a cached tiny model directory (built on first use); other names pass through."""
    if not name_or_path.startswith(TINY_PREFIX):
        return name_or_path
    arch = name_or_path[len(TINY_PREFIX) :]
    cache = Path(os.environ.get("ALIGNKIT_CACHE", Path.home() / ".cache" / "alignkit")) / "tiny"
    return make_tiny_model(cache / arch, arch=arch)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(args: ModelArguments) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the causal LM and its tokenizer. The LoRA adapter is attached by the trainer (``peft_config``).

    With ``load_in_4bit`` the base is quantised to NF4 and prepared for k-bit training (QLoRA).
    """
    path = resolve_model_path(args.model_name_or_path)
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


def _tiny_config(arch: str, vocab_size: int, hidden_size: int, num_layers: int, tokenizer, max_positions: int):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden_size // 16),
        num_key_value_heads=max(1, hidden_size // 32),
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


def load_for_generation(name: str, adapter: str | None = None, dtype: str = "auto"):
    """A model and tokenizer to sample or evaluate with: ``name`` loaded as in training, an optional LoRA
    ``adapter`` directory on top, moved to the GPU when there is one."""
    model, tokenizer = load_model_and_tokenizer(ModelArguments(model_name_or_path=name, dtype=dtype))
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
    seed: int = 0,
    texts: list[str] | None = None,
) -> str:
    """Build a small random causal LM and its tokenizer offline and ``save_pretrained`` them to ``path``.

    Deterministic for given arguments. If ``path`` already holds a model built with the same arguments
    it is reused. Builders take a file lock next to ``path`` and write atomically (build in a temp dir,
    then rename), so several processes may call this at once. Returns ``str(path)``.
    """
    from alignkit.tasks import arithmetic

    path = Path(path)
    spec = dict(arch=arch, hidden_size=hidden_size, num_layers=num_layers, vocab_size=vocab_size,
                max_positions=max_positions, seed=seed)
    texts = texts if texts is not None else arithmetic.corpus() + _ENGLISH
    spec["texts_sha"] = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    stamp = path / "alignkit_tiny.json"
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        return str(path)

    path.parent.mkdir(parents=True, exist_ok=True)
    # one builder at a time (several training processes may start together); the others wait, then
    # find the stamp and reuse the model
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and json.loads(stamp.read_text()) == spec:
            return str(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            tokenizer = train_tiny_tokenizer(texts, vocab_size=vocab_size)
            config = _tiny_config(arch, len(tokenizer), hidden_size, num_layers, tokenizer, max_positions)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            # not model.save_pretrained: under torch.distributed it writes weights on rank 0 only, and the
            # rank holding this lock may be another one
            import safetensors.torch

            model.config.save_pretrained(tmp)
            model.generation_config.save_pretrained(tmp)
            weights, seen = {}, set()
            for name, tensor in model.state_dict().items():  # tied weights: keep the first name, as HF does
                if tensor.data_ptr() not in seen:
                    seen.add(tensor.data_ptr())
                    weights[name] = tensor.contiguous()
            safetensors.torch.save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            tokenizer.save_pretrained(tmp)
            (tmp / "alignkit_tiny.json").write_text(json.dumps(spec))
            if path.exists():  # a stale model built with other arguments
                shutil.rmtree(path)
            os.replace(tmp, path)  # atomic: a reader sees no model or a complete one
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


_ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "A model should move away from wrong, harmful or unwanted outputs.",
    "You are a helpful assistant. Answer the question step by step.",
    "The answer is correct. The answer is wrong. Let us check each step again.",
    "Preference optimisation compares a chosen response with a rejected response.",
]
