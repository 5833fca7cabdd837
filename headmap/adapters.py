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
    """y = W0 x + b + s B A drop(x), s = alpha / r: PEFT's LoRA. With dora=True, DoRA (Liu et al. 2024) as its
    reference code and PEFT compute it:
        y = W0 x + b + (m/n - 1) W0 drop(x) + (m/n) s B A drop(x),   n = ||W0 + s B A|| per output row,
    n detached from the graph (DoRA section 4.3) and m initialised to ||W0||. Without dropout (or in eval mode) this
    is m/n (W0 x + s B A x) + b, the merged weight's output."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, dora: bool):
        super().__init__()
        self.A = nn.Linear(base.in_features, rank, bias=False)
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        self.B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.B.weight)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        weight = base.weight.detach()
        weight = weight.full_tensor() if hasattr(weight, "full_tensor") else weight  # FSDP keeps it sharded here
        self.magnitude = nn.Parameter(weight.float().norm(dim=1)) if dora else None
        self._norm, self._norm_key = None, None

    def hook(self, module: nn.Linear, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """Forward hook of the adapted linear layer: its output (..., out_features) with the low-rank update added."""
        x = self.dropout(args[0].to(self.A.weight.dtype))
        lora = self.B(self.A(x))
        if self.magnitude is None:
            return out + (lora * self.scaling).to(out.dtype)
        scale = self.magnitude / self.weight_norm(module)
        if self.training and self.dropout.p > 0:  # W0 sees the same dropped-out input as the low-rank path
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
    adapter = Adapter("dora" if dora else "lora", config)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in found:
            lora = LoRA(module, rank, alpha, dropout, dora).to(module.weight.device)
            adapter.sites[name.replace(".", "/")] = lora
            adapter._handles.append(module.register_forward_hook(lora.hook))
    adapter.claim(model)
    return adapter


# ---------------------------------------------------------------- files: adapter_config.json + adapter_model.safetensors

# PEFT options that do not change what a trained LoRA computes (metadata, or how its weights were initialised)
PEFT_INERT = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
              "auto_mapping", "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
              "megatron_core", "qalora_group_size"}
PEFT_HONOURED = {"r", "lora_alpha", "lora_dropout", "target_modules", "use_dora"}


def _peft_key(site: str, ours: str) -> str:
    """Our state-dict key of a LoRA site -> PEFT's saved key (base_model.model.<module>.lora_A.weight ...)."""
    part = {"A.weight": "lora_A.weight", "B.weight": "lora_B.weight", "magnitude": "lora_magnitude_vector"}[ours]
    return f"base_model.model.{site.replace('/', '.')}.{part}"


def _lora_arguments(config: dict) -> dict:
    """attach_lora's arguments from a PEFT LoraConfig; any option that would change the computation is refused."""
    if config["peft_type"] != "LORA":
        raise ValueError(f"PEFT type {config['peft_type']} is not supported; only LORA (with or without DoRA)")
    for key, value in config.items():
        if key not in PEFT_INERT | PEFT_HONOURED and value not in (None, False, "none", {}, []):
            raise ValueError(f"PEFT option {key}={value!r} is not supported here; load this adapter with PEFT")
    if not isinstance(config.get("target_modules"), list):
        raise ValueError(f"target_modules must be a list of module names, got {config.get('target_modules')!r}")
    return dict(rank=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                dora=bool(config.get("use_dora")), targets=tuple(config["target_modules"]))


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
        The Adapter, attached. A HeadMap adapter read from its LoRA form computes the same map with b_down = 0 and
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
            adapter = attach_lora(model, **_lora_arguments(config))
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
    return adapter


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
            merged = _with_o_proj_bias(model)
            attn = attention_modules(merged)
            for layer, hm in adapter.sites.items():
                o_proj = attn[int(layer)].o_proj
                up, down = hm.up.weight.double(), hm.down.weight.double()
                o_proj.weight[:, hm.cols] += (hm.scaling * up @ down).to(o_proj.weight.dtype)
                o_proj.bias += (hm.scaling * (up @ hm.down.bias.double() + hm.up.bias.double())).to(o_proj.bias.dtype)
        else:
            merged, modules = model, dict(model.named_modules())
            for site, lora in adapter.sites.items():
                module = modules[site.replace("/", ".")]
                weight = lora.merged_weight(module)
                if lora.magnitude is not None:
                    weight = lora.magnitude[:, None] * weight / weight.norm(dim=1, keepdim=True)
                module.weight.copy_(weight.to(module.weight.dtype))
    adapter.remove()
    return merged


def _with_o_proj_bias(model: nn.Module) -> nn.Module:
    """`model` itself if every o_proj has a bias, else a copy built with config.attention_bias = True."""
    if all(m.o_proj.bias is not None for m in attention_modules(model)):
        return model
    if not hasattr(model.config, "attention_bias"):
        raise ValueError(f"{model.config.model_type}: o_proj has no bias and the config has no attention_bias switch "
                         "to add one, so HeadMap's bias cannot be merged; use the adapter with its hooks instead")
    config = copy.deepcopy(model.config)
    config.attention_bias = True
    param = next(model.parameters())
    merged = type(model)(config).to(device=param.device, dtype=param.dtype).eval()
    missing, unexpected = merged.load_state_dict(model.state_dict(), strict=False)
    if unexpected or not all(k.endswith("_proj.bias") for k in missing) or \
            any(m.o_proj.bias is None for m in attention_modules(merged)):
        raise ValueError(f"{model.config.model_type}: attention_bias=True does not just add attention biases, so "
                         "HeadMap cannot be merged into it; use the adapter with its hooks instead")
    with torch.no_grad():
        for key in missing:
            merged.get_parameter(key).zero_()
    return merged
