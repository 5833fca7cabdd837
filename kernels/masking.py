"""Ablate attention heads of any LLaMA-family Hugging Face model, per sequence.

    with mask_heads(model, mask):   # mask: bool (layers, heads) or (layers, batch, heads), True = ablated
        logits = model(input_ids).logits

The masked attention is registered as a transformers attention implementation (the public AttentionInterface),
so no forward method is rewritten: inside the context the model's own attention modules call it, each with
its layer's slice of the mask, and on exit the model's previous implementation comes back.
"""
from contextlib import contextmanager

import torch
from transformers import AttentionInterface

from kernels.attention import masked_attention

ATTENTION_NAME = "headmap_masked"


def headmap_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    # No mask function is registered under this name, so transformers hands over attention_mask=None and the
    # kernel applies the causal mask alone: exact for right-padded batches, which is what this project builds.
    return masked_attention(query, key, value, getattr(module, "head_mask", None), scaling), None


AttentionInterface.register(ATTENTION_NAME, headmap_attention)


def attention_modules(model) -> list:
    """The self-attention module of every layer, in layer order."""
    found = [m for m in model.modules() if hasattr(m, "o_proj") and isinstance(getattr(m, "layer_idx", None), int)]
    if len(found) != model.config.num_hidden_layers:
        raise ValueError(f"{type(model).__name__}: found {len(found)} attention modules with o_proj and layer_idx "
                         f"for {model.config.num_hidden_layers} layers; only LLaMA-family models are supported")
    return sorted(found, key=lambda m: m.layer_idx)


@contextmanager
def mask_heads(model, mask: torch.Tensor):
    """Run `model` with heads ablated: mask[l, h] (same head set for every sequence) or mask[l, b, h] (one head
    set per sequence of the batch), True = that head's output is zero."""
    modules = attention_modules(model)
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    if mask.dtype != torch.bool or mask.dim() not in (2, 3) or mask.shape[0] != layers or mask.shape[-1] != heads:
        raise ValueError(f"head mask must be a bool tensor of shape ({layers}, {heads}) or ({layers}, batch, "
                         f"{heads}); got {mask.dtype} {tuple(mask.shape)}")
    device = next(model.parameters()).device
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    for m in modules:
        m.head_mask = mask[m.layer_idx].to(device)
    try:
        yield model
    finally:
        for m in modules:
            del m.head_mask
        model.set_attn_implementation(previous)
