import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

# transformers binds its log handler to whatever sys.stderr is when it first logs. Configure it now, under
# pytest's session-long capture: configured first inside a test's capsys, it keeps that test's stream, which
# is closed afterwards, and every later transformers warning prints "--- Logging error ---" with a traceback
# (test_cli_mistakes then test_malformed_inputs, run alone, failed on that).
hf_logging.get_logger("transformers")


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    from alignkit.modeling import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", "qwen2")


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory):
    from alignkit.modeling import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama", seed=1)


@pytest.fixture
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


def load_tiny(path, attn_implementation="sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread and do not oversubscribe a shared CPU (use per module with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Crash(Exception):
    """A simulated crash, raised by :class:`CrashAfterSave`."""


def crash_after_save(step: int):
    """A callback that raises :class:`Crash` right after the checkpoint of ``step`` is written (resume tests)."""
    from transformers import TrainerCallback

    class CrashAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == step:
                raise Crash

    return CrashAfterSave()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
