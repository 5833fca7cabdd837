"""Adapters on disk, in PEFT's layout: save_adapter writes what PeftModel.from_pretrained loads, load_adapter reads
it back (and PEFT's own LoRA/DoRA folders, their options computed as PEFT computes them).

    save_adapter(adapter, folder); adapter = load_adapter(model, folder)
"""
import json
import math
import os
import re

import torch
from torch import nn

from .adapters import Adapter, _attach_sites, attach_headmap, check_unadapted
from .files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, HEADMAP_CONFIG, atomic


# PEFT options that do not change what a trained LoRA computes (metadata, how its weights were initialised, or
# fan_in_fan_out, which PEFT turns off for the nn.Linear layers that are all this loader adapts)
PEFT_INERT = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
              "auto_mapping", "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
              "megatron_core", "qalora_group_size", "runtime_config", "fan_in_fan_out", "ensure_weight_tying"}
# ... and those that are LoRA arithmetic, computed here as PEFT computes them (peft_lora_sites)
PEFT_HONOURED = {"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform",
                 "layers_pattern", "rank_pattern", "alpha_pattern", "use_rslora", "lora_bias", "use_dora", "bias"}


def _peft_key(site: str, ours: str) -> str:
    """Our state-dict key of a LoRA site -> PEFT's saved key (base_model.model.<module>.lora_A.weight ...)."""
    part = {"A.weight": "lora_A.weight", "B.weight": "lora_B.weight", "B.bias": "lora_B.bias",
            "magnitude": "lora_magnitude_vector"}[ours]
    return f"base_model.model.{site.replace('/', '.')}.{part}"


def _matches(names, key: str) -> bool:
    """PEFT's rule for target_modules and exclude_modules: a string is a regular expression the whole module name
    must match; a list matches a name equal to an item or ending in "." + item."""
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return key in names or any(key.endswith("." + name) for name in names)


def _layer_index(key: str, layers_pattern) -> int | None:
    """The layer number in a module name, as PEFT reads it for layers_to_transform: the first number after
    layers_pattern (any name where it is empty)."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    for pattern in patterns or [None]:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\." if pattern is None else rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.",
                         key)
        if found:
            return int(found["idx"])
    return None


def _pattern_value(patterns: dict, key: str, default):
    """rank_pattern / alpha_pattern: the value of the first pattern that ends the module name, as PEFT picks it."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def peft_lora_sites(model: nn.Module, config: dict) -> dict[str, tuple[int, float]]:
    """{module name: (r, lora_alpha)} of the layers a PEFT LoraConfig adapts in `model`, chosen as PEFT chooses them
    (target_modules, exclude_modules, layers_to_transform with layers_pattern, rank_pattern, alpha_pattern). An
    option that is not LoRA arithmetic, or a target that is not a linear layer, is refused (ValueError)."""
    if config.get("peft_type") != "LORA":
        raise ValueError(f"PEFT type {config.get('peft_type')} is not supported; only LORA (with or without DoRA)")
    for key, value in config.items():
        if key not in PEFT_INERT | PEFT_HONOURED and value not in (None, False, "none", {}, []):
            raise ValueError(f"PEFT option {key}={value!r} is not LoRA arithmetic on linear layers, so it is not "
                             "supported here; load this adapter with PEFT")
    if config.get("bias", "none") != "none":
        raise ValueError(f"PEFT option bias={config['bias']!r} trains the model's own biases, which this loader does "
                         "not replace; load this adapter with PEFT")
    if config.get("use_dora") and config.get("lora_bias"):
        raise ValueError("PEFT options use_dora and lora_bias together are not supported (nor by PEFT)")
    targets, layers = config.get("target_modules"), config.get("layers_to_transform")
    if not targets or not isinstance(targets, (str, list)):
        raise ValueError(f"target_modules must be a regular expression or a list of module names, got {targets!r}")
    layers = [layers] if isinstance(layers, int) else layers
    sites = {}
    for name, module in model.named_modules():
        if not name or not _matches(targets, name) or _matches(config.get("exclude_modules") or [], name):
            continue
        if layers and not isinstance(targets, str) and _layer_index(name, config.get("layers_pattern")) not in layers:
            continue  # PEFT applies layers_to_transform to a list of targets only
        if not isinstance(module, nn.Linear):
            raise ValueError(f"its target_modules match {name}, a {type(module).__name__}: LoRA is supported here on "
                             "linear layers only; load this adapter with PEFT")
        sites[name] = (_pattern_value(config.get("rank_pattern") or {}, name, config["r"]),
                       _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"]))
    if not sites:
        raise ValueError(f"its target_modules {targets!r} match no linear layer of {type(model).__name__}")
    return sites


HS_NOT_PEFT = ("the HS variant adds its map after the MLP, which no PEFT LoRA computes: load it with headmap's "
               "load_adapter (its own layout)")


def headmap_as_lora(adapter: Adapter) -> tuple[dict, dict[str, torch.Tensor]]:
    """The MHA map as the LoRA on o_proj that it equals, in PEFT's saved form: (adapter_config, tensors).

    s (W_up (W_down x_R + b_down) + b_up) = s (B (A x) + b_B) with A = W_down on the circuit heads' columns of the
    o_proj input (zero elsewhere), B = W_up, b_B = W_up b_down + b_up (PEFT's lora_bias) and s = lora_alpha / r.
    """
    tensors = {}
    with torch.no_grad():
        for layer, hm in adapter.sites.items():
            key = f"base_model.model.{adapter.targets[layer]}"
            a = torch.zeros(hm.down.out_features, hm.width, dtype=hm.down.weight.dtype, device=hm.down.weight.device)
            a[:, hm.cols] = hm.down.weight
            bias = hm.up.weight.double() @ hm.down.bias.double() + hm.up.bias.double()
            tensors |= {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": hm.up.weight,
                        f"{key}.lora_B.bias": bias.to(hm.up.bias.dtype)}
    rank, scaling = adapter.config["rank"], adapter.config["scaling"]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.config.get("base_model_name_or_path"),
        "r": rank,
        "lora_alpha": scaling * rank,  # PEFT scales by lora_alpha / r: HeadMap's s
        "lora_dropout": 0.0,
        "lora_bias": True,  # b_B: HeadMap's two biases as one
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "target_modules": sorted(adapter.targets.values()),  # exactly the circuit layers' o_proj modules
        "inference_mode": True,
    }
    return config, tensors


def save_adapter(adapter: Adapter, folder: str) -> None:
    """Write `adapter` to `folder` in PEFT's layout, so `PeftModel.from_pretrained(base, folder)` loads it.

    adapter_config.json and adapter_model.safetensors, each written atomically. LoRA and DoRA are PEFT's own. A
    HeadMap MHA adapter is saved as the LoRA on o_proj it equals (headmap_as_lora); headmap.json beside them keeps
    what HeadMap adds (method, variant, circuit), so load_adapter builds the HeadMap modules back. The HS variant
    keeps HeadMap's own layout (HS_NOT_PEFT, said in its adapter_config.json too).

    Args:
        adapter: what attach_headmap, attach_lora or load_adapter returned.
        folder: created if missing; the adapter's files in it are replaced whole, other files are kept.
    """
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    extra = None
    if adapter.method == "headmap" and adapter.config["variant"] == "mha":
        config, tensors = headmap_as_lora(adapter)
        extra = {**adapter.config, "saved_as": "a PEFT LoRA on o_proj with lora_bias (headmap_as_lora)"}
    elif adapter.method == "headmap":
        config, tensors = {**adapter.config, "peft": "not loadable: " + HS_NOT_PEFT}, adapter.state_dict()
    else:
        config = adapter.config
        tensors = {_peft_key(*key[len("sites."):].split(".", 1)): value for key, value in adapter.state_dict().items()}
    with atomic(os.path.join(folder, ADAPTER_WEIGHTS)) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    for name, content in ((ADAPTER_CONFIG, config), (HEADMAP_CONFIG, extra)):
        if content is not None:
            with atomic(os.path.join(folder, name)) as tmp, open(tmp, "w") as f:
                json.dump(content, f, indent=1)


def load_adapter(model: nn.Module, folder: str) -> Adapter:
    """Attach the adapter saved in `folder` to `model`, its base model.

    An adapter that does not fit `model` (another base model) raises ValueError, and nothing stays attached.

    Args:
        model: the base model the adapter was trained on.
        folder: written by save_adapter (in either of HeadMap's layouts: PEFT's LoRA form, or its own), or a PEFT
            LoRA/DoRA folder.

    Returns:
        The Adapter, attached, in eval mode (no dropout). A HeadMap adapter read from its LoRA form computes the same map with b_down = 0 and
        b_up = b_B (the saved form keeps only their sum through W_up).
    """
    from safetensors.torch import load_file
    config, meta = (_read_json(os.path.join(folder, name)) for name in (ADAPTER_CONFIG, HEADMAP_CONFIG))
    tensors = load_file(os.path.join(folder, ADAPTER_WEIGHTS), device=str(next(model.parameters()).device))
    described = meta if meta is not None else config  # what the adapter is: HeadMap's file, else PEFT's config
    try:
        if described.get("method") == "headmap":
            circuit = {int(k): v for k, v in described["heads"].items()}
            adapter = attach_headmap(model, circuit, described["rank"], described["scaling"], described["variant"])
        elif "peft_type" in config:
            check_unadapted(model)
            method = "dora" if config.get("use_dora") else "lora"
            adapter = _attach_sites(model, Adapter(method, config), peft_lora_sites(model, config),
                                    config.get("lora_dropout", 0.0), bool(config.get("use_dora")),
                                    bool(config.get("use_rslora")), bool(config.get("lora_bias")))
        else:
            raise ValueError("adapter_config.json is neither a HeadMap adapter nor a PEFT LoRA/DoRA adapter")
    except (KeyError, TypeError) as err:
        raise ValueError(f"adapter_config.json or {HEADMAP_CONFIG} lacks or garbles {err}") from None
    try:
        if meta is not None:
            tensors = _headmap_from_lora(adapter, config, tensors)
        elif adapter.method != "headmap":
            ours = {_peft_key(*key[len("sites."):].split(".", 1)): key for key in adapter.state_dict()}
            tensors = {ours.get(k, k): v for k, v in tensors.items()}  # an unknown key stays, for the error to name
        adapter.load_state_dict(tensors)
    except ValueError:
        adapter.remove()
        raise
    except RuntimeError as err:  # missing, unexpected or differently shaped weights: made for another model
        adapter.remove()
        raise ValueError(f"its weights do not fit {type(model).__name__} ({' '.join(str(err).split())[:300]})") from None
    adapter.config = config if meta is None else {k: v for k, v in meta.items() if k != "saved_as"}
    return adapter.eval()  # ready to score, as PEFT's from_pretrained: adapter.train() (or model.train()) to train


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _headmap_from_lora(adapter: Adapter, config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The HeadMap state dict of `adapter` from its LoRA form (headmap_as_lora): W_down = A on the circuit columns,
    b_down = 0, W_up = B, b_up = b_B. A LoRA that is not such a map (another r or scaling, other target modules, A
    non-zero off the circuit's columns) is refused."""
    rank, scaling = adapter.config["rank"], adapter.config["scaling"]
    if config.get("r") != rank or not math.isclose(config.get("lora_alpha", 0) / rank, scaling):
        raise ValueError(f"adapter_config.json's r and lora_alpha do not give {HEADMAP_CONFIG}'s rank {rank} and "
                         f"scaling {scaling}")
    if sorted(config.get("target_modules") or []) != sorted(adapter.targets.values()):
        raise ValueError(f"its target_modules {config.get('target_modules')} are not this model's o_proj modules of "
                         f"the circuit's layers ({', '.join(sorted(adapter.targets.values()))})")
    state = {}
    for layer, hm in adapter.sites.items():
        key = f"base_model.model.{adapter.targets[layer]}"
        a, b, bias = (tensors.pop(f"{key}.{name}", None) for name in ("lora_A.weight", "lora_B.weight", "lora_B.bias"))
        if a is None or b is None or bias is None or a.shape != (rank, hm.width):
            raise ValueError(f"its weights do not fit {adapter.targets[layer]}: lora_A ({rank}, {hm.width}), lora_B "
                             "and lora_B.bias expected")
        cols = hm.cols.to(a.device)
        off = torch.ones(hm.width, dtype=torch.bool, device=a.device).index_fill_(0, cols, False)
        if bool(a[:, off].any()):
            raise ValueError(f"its lora_A of {adapter.targets[layer]} reads columns outside the circuit's heads: a LoRA "
                             "of its own, not a HeadMap map; load it with PEFT")
        state |= {f"sites.{layer}.down.weight": a[:, cols],
                  f"sites.{layer}.down.bias": torch.zeros(rank, dtype=a.dtype, device=a.device),
                  f"sites.{layer}.up.weight": b,
                  f"sites.{layer}.up.bias": bias}
    return state | tensors  # a key left over stays, for load_state_dict to name
