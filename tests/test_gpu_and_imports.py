"""GPU-only paths (QLoRA) run for real with CUDA and skip without it; the CPU path never imports them."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import requires_cuda

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_training_path_never_imports_gpu_only_packages(tmp_path):
    code = (
        "import sys\n"
        "from alignkit.recipes import parse_recipe, run_recipe\n"
        f"run_recipe(*parse_recipe('recipes/dpo_tiny.yaml', ['--max_steps', '2', '--eval_strategy', 'no',"
        f" '--save_strategy', 'no', '--use_peft', 'true', '--output_dir', {str(tmp_path / 'o')!r}]))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'bitsandbytes'))\n"
        "print('GPU_ONLY_MODULES', bad)\n"
    )
    env = {**os.environ, "ALIGNKIT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GPU_ONLY_MODULES []" in proc.stdout


def test_load_in_4bit_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    from alignkit.modeling import ModelArguments, load_model_and_tokenizer

    with pytest.raises(RuntimeError, match="needs a CUDA GPU and bitsandbytes"):
        load_model_and_tokenizer(ModelArguments(model_name_or_path="tiny:qwen2", load_in_4bit=True))


@pytest.mark.gpu
@requires_cuda
def test_qlora_dpo_step_on_gpu(tiny_model_path, tmp_path):
    pytest.importorskip("bitsandbytes")
    from alignkit.modeling import ModelArguments, load_model_and_tokenizer, lora_config
    from alignkit.tasks.arithmetic import make_preference_pairs
    from alignkit.trainers import DPOConfig, DPOTrainer

    args = ModelArguments(model_name_or_path=tiny_model_path, load_in_4bit=True, lora_r=4, lora_alpha=8)
    model, tok = load_model_and_tokenizer(args)
    assert any("Linear4bit" in type(m).__name__ for m in model.modules())
    trainer = DPOTrainer(model=model, args=DPOConfig(output_dir=str(tmp_path), max_steps=3, report_to="none",
                                                     per_device_train_batch_size=4, learning_rate=1e-3,
                                                     save_strategy="no", bf16=True),
                         train_dataset=make_preference_pairs(16), processing_class=tok, peft_config=lora_config(args))
    assert trainer.reference_mode == "adapter" and trainer.ref_model is None
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
