"""Trainable adapters for a frozen LLaMA-family model: HeadMap (the paper's method), LoRA and DoRA.

All three attach through forward hooks, so the model's modules and forward methods stay untouched, and
`adapter.remove()` gives the base model back. Each starts as the identity: the model's logits are unchanged
until training moves the zero-initialised up-projection (HeadMap) or B matrix (LoRA, DoRA).

    adapter = attach_headmap(model, circuit, rank=32, scaling=1.0, variant="mha")
    adapter = attach_lora(model, rank=32, alpha=64, dropout=0.05, dora=False)
"""
import json
import math
import os

import torch
from torch import nn

from kernels.masking import attention_modules

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


class HeadMap(nn.Module):
    """map(x) = s * W_up (W_down x_R + b_down) + b_up, x_R = the retained heads' slices of the o_proj input."""

    def __init__(self, heads: list[int], head_dim: int, hidden: int, rank: int, scaling: float):
        super().__init__()
        cols = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])
        self.register_buffer("cols", cols, persistent=False)
        self.down = nn.Linear(len(cols), rank)  # default init: kaiming-uniform weight, default bias
        self.up = nn.Linear(rank, hidden)
        nn.init.zeros_(self.up.weight)  # zero up-projection: the model starts exactly as the base model
        nn.init.zeros_(self.up.bias)
        self.scaling = scaling

    def forward(self, x):
        x_r = x[..., self.cols].to(self.down.weight.dtype)
        return (self.scaling * self.up(self.down(x_r))).to(x.dtype)


class LoRA(nn.Module):
    """y = W0 x + b + s B A dropout(x), s = alpha / r. With dora=True (DoRA, Liu et al. 2024):
    y = m / ||W0 + s B A|| * (W0 x + s B A dropout(x)) + b, norm per output row, detached from the graph
    (DoRA section 4.3), m initialised to ||W0||."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, dora: bool):
        super().__init__()
        self.A = nn.Linear(base.in_features, rank, bias=False)
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        self.B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.B.weight)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.magnitude = nn.Parameter(base.weight.detach().float().norm(dim=1)) if dora else None

    def hook(self, module, args, out):
        x = args[0].to(self.A.weight.dtype)
        delta = self.B(self.A(self.dropout(x))) * self.scaling
        if self.magnitude is None:
            return out + delta.to(out.dtype)
        weight = module.weight.float() + self.scaling * (self.B.weight @ self.A.weight)
        scale = self.magnitude / weight.norm(dim=1).detach()
        bias = 0.0 if module.bias is None else module.bias.float()
        # = scale * (W0 x + delta) + b, written so that at initialisation (scale 1, delta 0) it is exactly `out`
        return (out.float() + (scale - 1) * (out.float() - bias) + scale * delta).to(out.dtype)


class Adapter(nn.Module):
    """The trainable modules of one adapter, by site name, plus the hooks that wire them into the model."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.sites = nn.ModuleDict()
        self._handles = []

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def attach_headmap(model, circuit: dict[int, list[int]], rank: int = 32, scaling: float = 1.0,
                   variant: str = "mha") -> Adapter:
    """One HeadMap per circuit layer. "mha": added to that layer's attention output (o_proj(x) + map(x_R));
    "hs": added to the layer's output hidden state, after the MLP residual."""
    if variant not in ("mha", "hs"):
        raise ValueError(f"unknown HeadMap variant {variant!r}; use mha or hs")
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    adapter = Adapter({"method": "headmap", "variant": variant, "rank": rank, "scaling": scaling,
                       "heads": {str(k): v for k, v in circuit.items()}})
    attn = attention_modules(model)
    device = next(model.parameters()).device
    for layer, heads in sorted(circuit.items()):
        hm = HeadMap(heads, head_dim, cfg.hidden_size, rank, scaling).to(device)
        adapter.sites[str(layer)] = hm
        o_proj = attn[layer].o_proj
        if variant == "mha":
            adapter._handles.append(o_proj.register_forward_hook(lambda m, args, out, hm=hm: out + hm(args[0])))
        else:
            stash = {}
            adapter._handles.append(o_proj.register_forward_pre_hook(
                lambda m, args, stash=stash: stash.__setitem__("x", args[0])))

            def add_to_output(m, args, out, hm=hm, stash=stash):
                delta = hm(stash.pop("x"))
                return (out[0] + delta, *out[1:]) if isinstance(out, tuple) else out + delta
            adapter._handles.append(model.base_model.layers[layer].register_forward_hook(add_to_output))
    return adapter


def attach_lora(model, rank: int = 32, alpha: float = 64, dropout: float = 0.05, dora: bool = False,
                targets=LORA_TARGETS) -> Adapter:
    adapter = Adapter({"method": "dora" if dora else "lora", "rank": rank, "alpha": alpha, "dropout": dropout,
                       "targets": list(targets)})
    device = next(model.parameters()).device
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            lora = LoRA(module, rank, alpha, dropout, dora).to(device)
            adapter.sites[name.replace(".", "/")] = lora
            adapter._handles.append(module.register_forward_hook(lora.hook))
    if not adapter.sites:
        raise ValueError(f"no nn.Linear named {', '.join(targets)} in {type(model).__name__}")
    return adapter


def attach_from_config(model, config: dict) -> Adapter:
    if config["method"] == "headmap":
        circuit = {int(k): v for k, v in config["heads"].items()}
        return attach_headmap(model, circuit, config["rank"], config["scaling"], config["variant"])
    return attach_lora(model, config["rank"], config["alpha"], config["dropout"], config["method"] == "dora",
                       config["targets"])


def save_adapter(adapter: Adapter, folder: str, extra: dict | None = None) -> None:
    """adapter.safetensors + adapter_config.json, each written atomically."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}
    # written beside the target, then renamed over it: a crash leaves the old file, never half a new one
    weights, config = os.path.join(folder, "adapter.safetensors"), os.path.join(folder, "adapter_config.json")
    save_file(tensors, weights + ".tmp")
    os.chmod(weights + ".tmp", 0o644)  # safetensors writes its files private; these are meant to be shared
    os.replace(weights + ".tmp", weights)
    with open(config + ".tmp", "w") as f:
        json.dump({**adapter.config, **(extra or {})}, f, indent=1)
    os.replace(config + ".tmp", config)


def load_adapter(model, folder: str) -> Adapter:
    """Attach the adapter saved in `folder` to `model` (its base model) and load its weights."""
    from safetensors.torch import load_file
    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    adapter = attach_from_config(model, config)
    adapter.config = config
    adapter.load_state_dict(load_file(os.path.join(folder, "adapter.safetensors"),
                                      device=str(next(model.parameters()).device)))
    return adapter
