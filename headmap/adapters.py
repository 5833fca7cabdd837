"""Trainable adapters for a frozen Hugging Face decoder: HeadMap (the paper's method), LoRA and DoRA.

All three attach through forward hooks, so the model's modules and forward methods stay untouched, and
`adapter.remove()` gives the base model back. Each starts as the identity: the model's logits are unchanged
until training moves the zero-initialised up-projection (HeadMap) or B matrix (LoRA, DoRA).

    adapter = attach_headmap(model, circuit, rank=32, scaling=1.0, variant="mha")
    adapter = attach_lora(model, rank=32, alpha=64, dropout=0.05, dora=False)
    save_adapter(adapter, folder); load_adapter(model, folder)   # LoRA/DoRA folders are PEFT's layout
    model = merge_adapter(model, adapter)                         # a plain checkpoint: no hooks, no overhead
"""
import copy
import json
import math
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from .circuit import check_circuit
from .files import atomic
from .masking import UnsupportedModel, attention_modules, decoder_layers, layers_and_heads

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("up_proj",)}


class HeadMap(nn.Module):
    """s * map(x), map(x) = W_up (W_down x_R + b_down) + b_up, x_R = the retained heads' slices of the o_proj input.
    The scaling s multiplies the whole mapped value, b_up included (docs/PROTOCOL.md: the scaling multiplies the
    mapped value)."""

    def __init__(self, heads: list[int], head_dim: int, width: int, hidden: int, rank: int, scaling: float):
        super().__init__()
        self.width = width  # o_proj's input features: the LoRA form's A spans all of them
        cols = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])
        self.register_buffer("cols", cols, persistent=False)  # x_R's columns of the o_proj input (merge writes them)
        self.register_buffer("heads", torch.tensor(heads), persistent=False)
        self.head_dim = head_dim
        self.down = nn.Linear(len(cols), rank)  # default init: kaiming-uniform weight, default bias
        self.up = nn.Linear(rank, hidden)
        nn.init.zeros_(self.up.weight)  # zero up-projection: the model starts exactly as the base model
        nn.init.zeros_(self.up.bias)
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., heads * head_dim), o_proj's input -> s * map(x_R), (..., hidden)."""
        # whole heads by index_select, whose backward adds head_dim-long rows, not x[..., cols]: on CUDA that
        # gather's backward scatters one column at a time
        x_r = x.unflatten(-1, (-1, self.head_dim)).index_select(-2, self.heads).flatten(-2).to(self.down.weight.dtype)
        return (self.scaling * self.up(self.down(x_r))).to(x.dtype)


class LoRA(nn.Module):
    """y = W0 x + b + s (B A drop(x) + b_B), s = alpha / r (alpha / sqrt(r) with rslora): PEFT's LoRA, b_B only with
    its lora_bias. With dora=True, DoRA (Liu et al. 2024) as its reference code and PEFT compute it:
        y = W0 x + b + (m/n - 1) W0 drop(x) + (m/n) s B A drop(x),   n = ||W0 + s B A|| per output row,
    n detached from the graph (DoRA section 4.3) and m initialised to ||W0||. Without dropout (or in eval mode) this
    is m/n (W0 x + s B A x) + b, the merged weight's output.

    Dropout follows the adapted layer's training flag, not this module's: model.train() and model.eval() reach it as
    they reach the model's own dropout (Adapter.train sets the adapted layers' flags too)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, dora: bool, rslora: bool = False,
                 bias: bool = False):
        super().__init__()
        self.A = nn.Linear(base.in_features, rank, bias=False)
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        self.B = nn.Linear(rank, base.out_features, bias=bias)
        nn.init.zeros_(self.B.weight)
        if bias:
            nn.init.zeros_(self.B.bias)
        self.scaling = alpha / (math.sqrt(rank) if rslora else rank)
        self.dropout = dropout
        weight = base.weight.detach()
        weight = weight.full_tensor() if hasattr(weight, "full_tensor") else weight  # FSDP keeps it sharded here
        self.magnitude = nn.Parameter(weight.float().norm(dim=1)) if dora else None
        self._norm, self._norm_key = None, None

    def hook(self, module: nn.Linear, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """Forward hook of the adapted linear layer: its output (..., out_features) with the low-rank update added."""
        dropping = module.training and self.dropout > 0
        x = F.dropout(args[0].to(self.A.weight.dtype), self.dropout, training=dropping)
        lora = self.B(self.A(x))
        if self.magnitude is None:
            return out + (lora * self.scaling).to(out.dtype)
        scale = self.magnitude / self.weight_norm(module)
        if dropping:  # W0 sees the same dropped-out input as the low-rank path
            base = F.linear(x, module.weight.to(x.dtype)).float()
        else:  # no dropout: W0 x is the base output less its bias, no second matmul needed
            base = out.float() - (0.0 if module.bias is None else module.bias.float())
        # at initialisation scale is exactly 1 and lora exactly 0, so this is exactly `out`
        return (out.float() + (scale - 1) * base + scale * lora * self.scaling).to(out.dtype)

    def weight_norm(self, module: nn.Linear) -> torch.Tensor:
        """||W0 + s B A|| per output row, detached (DoRA section 4.3). The weights change only when the optimizer
        steps, so it is computed once per step, not once per micro-batch: it is kept until a version counter of
        A, B or W0 moves (every in-place update moves it)."""
        key = (self.A.weight._version, self.B.weight._version, module.weight._version)
        stale = self._norm is not None and self._norm.is_inference() and not torch.is_inference_mode_enabled()
        if key != self._norm_key or stale:  # an inference-mode tensor cannot take part in a backward pass
            with torch.no_grad():
                self._norm, self._norm_key = self.merged_weight(module).norm(dim=1), key
        return self._norm

    def merged_weight(self, module: nn.Linear) -> torch.Tensor:
        """W0 + s B A (before DoRA's rescaling), in fp32."""
        return module.weight.float() + self.scaling * (self.B.weight.float() @ self.A.weight.float())


class Adapter(nn.Module):
    """The trainable modules of one adapter, by site name, plus the hooks that wire them into the model.
    `config` is what adapter_config.json holds: PEFT's LoraConfig fields for LoRA and DoRA, ours for HeadMap."""

    def __init__(self, method: str, config: dict):
        super().__init__()
        self.method, self.config = method, config
        self.sites = nn.ModuleDict()
        self.targets = {}  # HeadMap: site -> the module name of the o_proj it maps into (PEFT's target_modules)
        self._handles = []
        self._adapted = []  # the model's linear layers whose forward hooks are LoRA sites (their training flag)

    def train(self, mode: bool = True) -> "Adapter":
        """Training or eval mode for the adapter and the flag of each layer it adapts, which LoRA's dropout reads:
        adapter.train() turns dropout on without waking the rest of the model (its own dropout stays off), and
        model.train() / model.eval() reach the adapter as they reach the model's own modules."""
        super().train(mode)
        for module in self._adapted:
            module.training = mode
        return self

    def remove(self) -> None:
        """Unhook every site: the model computes as the base model again (the adapter's weights stay here)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if getattr(self, "_model", None) is not None and self._model.__dict__.get(ATTACHED) is self:
            del self._model.__dict__[ATTACHED]
        self._model = None

    def claim(self, model: nn.Module) -> None:
        """Mark `model` as carrying this adapter. Kept in the model's __dict__, not as a submodule: the model's
        state_dict and parameters stay the base model's."""
        object.__setattr__(model, ATTACHED, self)
        object.__setattr__(self, "_model", model)


ATTACHED = "_headmap_adapter"  # the model's attribute naming the adapter attached to it


def check_unadapted(model: nn.Module) -> None:
    """Refuse a second adapter on a model that carries one (a notebook cell run twice would stack two maps)."""
    attached = model.__dict__.get(ATTACHED)
    if attached is not None:
        raise ValueError(f"a {attached.method} adapter is attached to this model already; call adapter.remove() on it "
                         "first (or merge it), then attach another")


def attach_headmap(model: nn.Module, circuit: dict[int, list[int]], rank: int = 32, scaling: float = 1.0,
                   variant: str = "mha") -> Adapter:
    """Attach one HeadMap per circuit layer to `model`, through forward hooks; it starts as the identity.

    A model that carries an adapter already is refused (ValueError): remove that one first.

    Args:
        model: a Hugging Face decoder whose attention modules have a linear o_proj; freeze it before training.
        circuit: {layer: [head, ...]}, the retained heads (read_circuit reads locate.py's heads.json).
        rank: r, the width of the map.
        scaling: s, which multiplies the whole mapped value.
        variant: "mha" adds s map(x_R) to the layer's attention output (o_proj(x) + s map(x_R)); "hs" adds it to the
            layer's output hidden state, after the MLP residual.

    Returns:
        The Adapter: its parameters are what trains; adapter.remove() gives the base model back.
    """
    if variant not in ("mha", "hs"):
        raise ValueError(f"unknown HeadMap variant {variant!r}; use mha or hs")
    check_unadapted(model)
    attn = attention_modules(model)  # first: a model without per-layer attention is refused by name
    layers, heads_per_layer = layers_and_heads(model)
    check_circuit(circuit, layers, heads_per_layer)
    module_names = {module: name for name, module in model.named_modules()}
    adapter = Adapter("headmap", {"method": "headmap", "variant": variant, "rank": rank, "scaling": scaling,
                                  "heads": {str(k): v for k, v in sorted(circuit.items())}})
    for layer, heads in sorted(circuit.items()):
        o_proj = attn[layer].o_proj
        if not isinstance(o_proj, nn.Linear):  # HeadMap reads its width and merges into its weight
            raise UnsupportedModel(f"{type(model).__name__}: its o_proj is a {type(o_proj).__name__}, not a linear "
                                   "layer, which HeadMap needs to attach to and merge into")
        head_dim = o_proj.in_features // heads_per_layer  # per layer: Gemma 4's global layers are wider
        hm = HeadMap(heads, head_dim, o_proj.in_features, o_proj.out_features, rank, scaling).to(o_proj.weight.device)
        adapter.sites[str(layer)] = hm  # on o_proj's device: device maps too
        adapter.targets[str(layer)] = module_names[o_proj]
        if variant == "mha":
            adapter._handles.append(o_proj.register_forward_hook(lambda m, args, out, hm=hm: out + hm(args[0])))
        else:
            stash = {}
            adapter._handles.append(o_proj.register_forward_pre_hook(
                lambda m, args, stash=stash: stash.__setitem__("x", args[0])))

            def add_to_output(m, args, out, hm=hm, stash=stash):
                delta = hm(stash.pop("x"))
                hidden = out[0] if isinstance(out, tuple) else out
                if hidden.shape != delta.shape:  # e.g. several residual streams (hyper-connections)
                    raise UnsupportedModel(f"{type(m).__name__} outputs a hidden state of shape {tuple(hidden.shape)}, "
                                           f"not o_proj's {tuple(delta.shape)}; the HS variant cannot add to it")
                return (hidden + delta, *out[1:]) if isinstance(out, tuple) else hidden + delta
            adapter._handles.append(decoder_layers(model)[layer].register_forward_hook(add_to_output))
    adapter.claim(model)
    return adapter


def lora_targets(model: nn.Module, targets: tuple[str, ...] = LORA_TARGETS) -> list[str]:
    """The projection names of `model` to adapt: `targets` where the model has them, and a fused projection in
    place of the separate ones it fuses (Phi-3's qkv_proj for q/k/v_proj, gate_up_proj for up_proj), as PEFT
    targets them."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    found = set(targets) & names
    for fused, parts in FUSED_PROJECTIONS.items():
        if fused in names and any(p in targets and p not in names for p in parts):
            found.add(fused)
    if not found:
        raise ValueError(f"{type(model).__name__} has none of the LoRA targets {', '.join(sorted(targets))} "
                         f"(nor a fused {' or '.join(FUSED_PROJECTIONS)}); its linear layers are {', '.join(sorted(names))}")
    return sorted(found)


def attach_lora(model: nn.Module, rank: int = 32, alpha: float = 64, dropout: float = 0.05, dora: bool = False,
                targets: tuple[str, ...] = LORA_TARGETS) -> Adapter:
    """Attach LoRA (or DoRA) to every linear layer named in `targets`, as PEFT's LoraConfig with these fields.

    B starts at zero, so the model starts as the base model. A model that carries an adapter already is refused.

    Args:
        model: a Hugging Face decoder; freeze it before training.
        rank: r; alpha: lora_alpha (the update is scaled by alpha / r); dropout: lora_dropout, on the layer's input.
        dora: DoRA's magnitude and direction instead of plain LoRA.
        targets: projection names; a fused projection stands in for the ones it fuses (lora_targets).

    Returns:
        The Adapter, whose config is the LoraConfig's fields (adapter_config.json).
    """
    check_unadapted(model)
    found = lora_targets(model, targets)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
              "target_modules": found, "use_dora": dora, "bias": "none"}
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in found]
    return _attach_sites(model, Adapter("dora" if dora else "lora", config), {name: (rank, alpha) for name in names},
                         dropout, dora)


def _attach_sites(model: nn.Module, adapter: Adapter, sites: dict[str, tuple[int, float]], dropout: float,
                  dora: bool, rslora: bool = False, bias: bool = False) -> Adapter:
    """Hook a LoRA of (r, alpha) onto each named linear layer of `model`; `adapter` holds them."""
    modules = dict(model.named_modules())
    for name, (rank, alpha) in sites.items():
        module = modules[name]
        lora = LoRA(module, rank, alpha, dropout, dora, rslora, bias).to(module.weight.device)
        adapter.sites[name.replace(".", "/")] = lora
        adapter._handles.append(module.register_forward_hook(lora.hook))
        adapter._adapted.append(module)
    adapter.claim(model)
    return adapter


# ---------------------------------------------------------------- files: adapter_config.json + adapter_model.safetensors

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


HEADMAP_FILE = "headmap.json"  # beside PEFT's two files: what HeadMap adds (method, variant, circuit), where PEFT
# does not read it (an unknown field in adapter_config.json would make PEFT warn)
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
    with atomic(os.path.join(folder, "adapter_model.safetensors")) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    for name, content in (("adapter_config.json", config), (HEADMAP_FILE, extra)):
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
    config, meta = (_read_json(os.path.join(folder, name)) for name in ("adapter_config.json", HEADMAP_FILE))
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"), device=str(next(model.parameters()).device))
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
        raise ValueError(f"adapter_config.json or {HEADMAP_FILE} lacks or garbles {err}") from None
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
        raise ValueError(f"adapter_config.json's r and lora_alpha do not give {HEADMAP_FILE}'s rank {rank} and "
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


# ---------------------------------------------------------------- merging into the base weights

def merge_adapter(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Fold `adapter` into the weights: a plain transformers model, with no hooks, that computes what the model
    with the adapter computes (to float rounding).

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
