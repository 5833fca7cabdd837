"""Trainable adapters for a frozen Hugging Face decoder: HeadMap (the paper's method), LoRA and DoRA.

All three attach through forward hooks, so the model's modules and forward methods stay untouched, and
`adapter.remove()` gives the base model back. Each starts as the identity: the model's logits are unchanged
until training moves the zero-initialised up-projection (HeadMap) or B matrix (LoRA, DoRA).

    adapter = attach_headmap(model, circuit, rank=32, scaling=1.0, variant="mha")
    adapter = attach_lora(model, rank=32, alpha=64, dropout=0.05, dora=False)

Saving and loading (PEFT's layout) is saving.py's, merging into the weights merging.py's.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .circuit import check_circuit
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
