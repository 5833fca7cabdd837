"""Ablate attention heads of a Hugging Face decoder, per sequence.

    with mask_heads(model, mask):   # mask: bool (layers, heads) or (layers, batch, heads), True = ablated
        logits = model(input_ids).logits

The masked attention is registered as a transformers attention implementation (the public AttentionInterface),
with transformers' SDPA mask builder beside it (AttentionMaskInterface), so no forward method is rewritten:
inside the context the model's own attention modules call it with their own scaling, soft-cap and the mask the
model built for their layer (sliding windows included), each with its layer's slice of the head mask; on exit
the model's previous implementation comes back.

Masking head h means its slice of o_proj's input is zero. That is what this computes only where o_proj reads
the attention output as it is, and where the attention is plain softmax attention. Anything else (attention
sinks, differential attention, a norm before o_proj, an attention argument not understood here) is refused with
an UnsupportedModel error before any masked compute.
"""
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kernels.attention import masked_attention
from kernels.model import UnsupportedModel

ATTENTION_NAME = "headmap_masked"
# arguments attention modules pass that do not change what softmax attention computes
BENIGN = {"position_ids", "cache_position", "use_cache", "output_attentions", "return_dict", "layer_idx",
          "past_key_values", "cache", "position_embeddings", "dropout", "is_causal", "logits_to_keep"}
FEATURES = {"s_aux": "attention sinks", "sinks": "attention sinks", "lambda_full": "differential attention"}


def headmap_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                      sliding_window=None, **kwargs):
    arch = type(module).__name__
    for name, value_ in kwargs.items():
        if name not in BENIGN and value_ is not None and value_ is not False:
            raise UnsupportedModel(f"{arch} passes {FEATURES.get(name, repr(name))} to its attention, which head "
                                   "masking cannot reproduce; this architecture is not supported")
    if kwargs.get("is_causal") is False:
        raise UnsupportedModel(f"{arch} runs bidirectional attention; head masking supports causal decoders")
    if dropout:
        raise UnsupportedModel(f"{arch} has attention dropout in training mode; call model.eval() first")
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        raise UnsupportedModel(f"{arch} built a {attention_mask.dtype} attention mask; expected transformers' "
                               "boolean SDPA mask")
    if sliding_window and attention_mask is None and key.shape[2] > sliding_window:
        raise UnsupportedModel(f"{arch} has a sliding window of {sliding_window} but its model built no mask "
                               f"for {key.shape[2]} keys")
    if attention_mask is not None and attention_mask.shape[-1] != key.shape[2]:
        # sliced only when needed: the kernel caches its key ranges on the tensor every layer of a type shares
        attention_mask = attention_mask[:, :, :, :key.shape[2]]
    out = masked_attention(query, key, value, getattr(module, "head_mask", None), scaling, attention_mask, softcap)
    if hasattr(module, "headmap_probe"):  # check_maskable is watching
        module.headmap_probe.append(out)
    return out, None


AttentionInterface.register(ATTENTION_NAME, headmap_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def layers_and_heads(model) -> tuple[int, int]:
    """The decoder's layer count and query heads per layer: a multimodal wrapper's (Gemma 3 4B and up, Gemma 4)
    from its text config, which is how AutoModelForCausalLM loads those checkpoints."""
    config = model.config.get_text_config()
    return getattr(config, "num_hidden_layers", None), getattr(config, "num_attention_heads", None)


def attention_modules(model) -> list:
    """The self-attention module of every layer, in layer order."""
    layers, _ = layers_and_heads(model)
    if layers is None:
        raise UnsupportedModel(f"{type(model).__name__}: its text config names no num_hidden_layers; head masking "
                               "needs a decoder")
    found = [m for m in model.modules() if hasattr(m, "o_proj") and isinstance(getattr(m, "layer_idx", None), int)]
    if len(found) != layers:
        raise UnsupportedModel(f"{type(model).__name__}: found {len(found)} attention modules with o_proj and "
                               f"layer_idx for {layers} layers; head masking needs one per layer")
    return sorted(found, key=lambda m: m.layer_idx)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's list of decoder layers, wherever the model keeps it: the ModuleList whose i-th entry holds
    layer i's attention module. Found once per model (locate swaps stand-ins into the list later)."""
    if "headmap_decoder_layers" in model.__dict__:
        return model.__dict__["headmap_decoder_layers"]
    attention = attention_modules(model)
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == len(attention) and all(
                any(sub is a for sub in layer.modules()) for layer, a in zip(m, attention)):
            model.__dict__["headmap_decoder_layers"] = m  # not a submodule: no second path to its weights
            return m
    raise UnsupportedModel(f"{type(model).__name__}: no list of decoder layers holds its attention modules in order")


@torch.no_grad()
def check_maskable(model) -> None:
    """Refuse, before any masked compute, a model where zeroing a head's attention output is not zeroing its slice
    of o_proj's input: one short forward checks that every layer's attention module calls the registered
    attention once and that o_proj reads exactly what it returned. Done once per model."""
    if getattr(model, "headmap_maskable", False):
        return
    decoder_layers(model)  # one attention module per decoder layer (LongCat-Flash has two): a head is (layer, h)
    modules = attention_modules(model)
    arch = type(model).__name__
    device = next(model.parameters()).device
    read = {}

    def reads(layer):
        return lambda o_proj, args: read.__setitem__(layer, args[0])

    hooks = {m.layer_idx: m.o_proj.register_forward_pre_hook(reads(m.layer_idx)) for m in modules}
    for m in modules:
        m.headmap_probe = []
    try:
        nothing = torch.zeros(layers_and_heads(model), dtype=torch.bool)
        with registered(model, modules, nothing):
            model(input_ids=torch.arange(1, 9, device=device)[None] % model.config.get_text_config().vocab_size)
        for m in modules:
            if len(m.headmap_probe) != 1:
                kind = "linear or recurrent attention" if not m.headmap_probe else "differential or custom attention"
                raise UnsupportedModel(f"{arch}: the attention of layer {m.layer_idx} calls the attention interface "
                                       f"{len(m.headmap_probe)} times per forward ({kind}); head masking is not "
                                       "supported on it")
            out, got = m.headmap_probe[0], read.get(m.layer_idx)
            if got is None or got.numel() != out.numel() or not torch.equal(got, out.reshape(got.shape)):
                raise UnsupportedModel(f"{arch}: o_proj of layer {m.layer_idx} does not read the attention output as "
                                       "it is (a norm or mixing comes between), so a masked head's slice of its input "
                                       "would not be zero; head masking is not supported on it")
    finally:
        for m in modules:
            hooks[m.layer_idx].remove()
            del m.headmap_probe
    model.headmap_maskable = True


@contextmanager
def registered(model, modules, mask):
    """The masked attention switched on, each attention module holding its layer's slice of `mask`."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    for m in modules:  # on the layer's own device: with a device map, the layers of one model sit on several
        m.head_mask = mask[m.layer_idx].to(next(m.o_proj.parameters()).device)  # a gated o_proj has no .weight
    try:
        yield model
    finally:
        for m in modules:
            del m.head_mask
        model.set_attn_implementation(previous)


@contextmanager
def mask_heads(model, mask: torch.Tensor):
    """Run `model` with heads ablated: mask[l, h] (same head set for every sequence) or mask[l, b, h] (one head
    set per sequence of the batch), True = that head's output is zero."""
    modules = attention_modules(model)
    layers, heads = layers_and_heads(model)
    if mask.dtype != torch.bool or mask.dim() not in (2, 3) or mask.shape[0] != layers or mask.shape[-1] != heads:
        raise ValueError(f"head mask must be a bool tensor of shape ({layers}, {heads}) or ({layers}, batch, "
                         f"{heads}); got {mask.dtype} {tuple(mask.shape)}")
    check_maskable(model)
    with registered(model, modules, mask):
        yield model
