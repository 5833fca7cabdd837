"""Random-weight models of the paper's shapes, for the GPU benchmarks (nothing to download, real sizes)."""
import torch

SHAPES = {"llama2-7b": dict(layers=32, hidden=4096, heads=32, kv_heads=32, intermediate=11008, vocab=32000),
          "llama3-8b": dict(layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=14336, vocab=128256)}
DRY_RUN_SHAPES = {"llama2-7b": dict(layers=2, hidden=64, heads=4, kv_heads=4, intermediate=96, vocab=256),
                  "llama3-8b": dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=512)}


def random_llama(shape: dict, dtype: torch.dtype, device: str, layers: int | None = None,
                 vocab: int | None = None, init_range: float = 0.02):
    """A LLaMA of `shape` (optionally fewer layers, another vocabulary) with random weights, built on `device` in
    `dtype`, in eval mode and frozen (seeded: the same weights each call)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=vocab or shape["vocab"], hidden_size=shape["hidden"],
                         num_hidden_layers=layers or shape["layers"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv_heads"], intermediate_size=shape["intermediate"],
                         max_position_embeddings=4096, initializer_range=init_range, attn_implementation="sdpa")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)
