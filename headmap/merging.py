"""Merging an adapter into the base weights, beside the forward it undoes (as PEFT's LoRA layer keeps merge beside
forward): a plain checkpoint with no hooks and no inference overhead.

    model = merge_adapter(model, adapter)
"""
import copy

import torch
from torch import nn

from .adapters import Adapter
from .masking import attention_modules


def merge_adapter(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Fold `adapter` into the weights: a plain transformers model, with no hooks, computing what the adapter did.

    The merged model computes what the model with the adapter computes, to float rounding.

    Merging sits beside the forward it undoes, as in PEFT:
    - LoRA: W = W0 + s B A.  DoRA: W = m * (W0 + s B A) / ||W0 + s B A|| (per output row).
    - HeadMap (MHA): the map is affine in the o_proj input, so o_proj's weight gains s W_up W_down on the retained
      heads' columns and o_proj gains the bias s (W_up b_down + b_up). A model without o_proj biases is rebuilt with
      its config's attention_bias switch on (q/k/v biases zero). HS adds after the MLP: it cannot be merged
      (ValueError).

    Args:
        model: the model the adapter is attached to; changed in place (or, for HeadMap without o_proj biases, copied).
        adapter: attached to `model`; it is removed.

    Returns:
        The merged model.
    """
    with torch.no_grad():
        if adapter.method == "headmap":
            if adapter.config["variant"] != "mha":
                raise ValueError("a HeadMap HS adapter cannot be merged: its map reads the heads' outputs but adds to "
                                 "the layer's output after the MLP, which no weight of the layer computes")
            merged = _with_biases(model, list(adapter.targets.values()))
            attn = attention_modules(merged)
            for layer, hm in adapter.sites.items():
                o_proj = attn[int(layer)].o_proj
                up, down = hm.up.weight.double(), hm.down.weight.double()
                o_proj.weight[:, hm.cols] += (hm.scaling * up @ down).to(o_proj.weight.dtype)
                o_proj.bias += (hm.scaling * (up @ hm.down.bias.double() + hm.up.bias.double())).to(o_proj.bias.dtype)
        else:
            biased = [site.replace("/", ".") for site, lora in adapter.sites.items() if lora.B.bias is not None]
            merged = _with_biases(model, biased)
            modules = dict(merged.named_modules())
            for site, lora in adapter.sites.items():
                module = modules[site.replace("/", ".")]
                weight = lora.merged_weight(module)
                if lora.magnitude is not None:
                    weight = lora.magnitude[:, None] * weight / weight.norm(dim=1, keepdim=True)
                module.weight.copy_(weight.to(module.weight.dtype))
                if lora.B.bias is not None:  # PEFT's lora_bias: scaled with the update, added to the layer's bias
                    module.bias += (lora.scaling * lora.B.bias.double()).to(module.bias.dtype)
    adapter.remove()
    return merged


def _with_biases(model: nn.Module, names: list[str]) -> nn.Module:
    """`model` itself if each of the named linear layers has a bias, else a copy built with the config's switches
    that give them one (attention_bias for the attention projections, mlp_bias for the others), new biases zero."""
    modules = dict(model.named_modules())
    if all(modules[name].bias is not None for name in names):
        return model
    inside = {id(sub) for attn in attention_modules(model) for sub in attn.modules()}
    in_attention = {name for name, m in modules.items() if id(m) in inside}
    switches = {"attention_bias" if name in in_attention else "mlp_bias" for name in names
                if modules[name].bias is None}
    config = copy.deepcopy(model.config)
    for switch in sorted(switches):
        if not hasattr(config, switch):
            raise ValueError(f"{config.model_type}: the adapter adds a bias to a layer that has none and the config has "
                             f"no {switch} switch to give it one, so it cannot be merged; use the adapter with its hooks "
                             "instead")
        setattr(config, switch, True)
    param = next(model.parameters())
    merged = type(model)(config).to(device=param.device, dtype=param.dtype).eval()
    missing, unexpected = merged.load_state_dict(model.state_dict(), strict=False)
    merged_modules = dict(merged.named_modules())
    if unexpected or not all(k.endswith(".bias") for k in missing) or \
            any(merged_modules[name].bias is None for name in names):
        raise ValueError(f"{config.model_type}: {' and '.join(sorted(switches))}=True does not just add biases, so the "
                         "adapter cannot be merged into it; use the adapter with its hooks instead")
    with torch.no_grad():
        for key in missing:
            merged.get_parameter(key).zero_()
    return merged
