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
from torch import nn

from . import distributed
from .attention import masked_attention
from .errors import UnsupportedModel, error_summary

ATTENTION_NAME = "headmap_masked"


# arguments attention modules pass that do not change what softmax attention computes
BENIGN = {"position_ids", "cache_position", "use_cache", "output_attentions", "return_dict", "layer_idx",
          "past_key_values", "cache", "position_embeddings", "dropout", "is_causal", "logits_to_keep"}
FEATURES = {"s_aux": "attention sinks", "sinks": "attention sinks", "lambda_full": "differential attention"}


def headmap_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      softcap: float | None = None, sliding_window: int | None = None, **kwargs) -> tuple:
    """The attention function transformers calls for ATTENTION_NAME: query (B, H, S, D), key/value (B, Hkv, S', D),
    attention_mask None or bool (B or 1, 1, S, >= S'). Returns ((B, S, H, D), None), the heads in
    module.head_mask zeroed; refuses any argument that would change what softmax attention computes."""
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
    if hasattr(module, "headmap_calls"):  # the probe is watching
        module.headmap_calls.append(out)
    return out, None


def register() -> None:
    """Register headmap_attention (and transformers' SDPA mask builder beside it) under ATTENTION_NAME: done at the
    first masked run, not at import, since transformers' masking module takes over a second to import and a script
    that refuses its input should not wait for it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(ATTENTION_NAME, headmap_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def layers_and_heads(model: nn.Module) -> tuple[int, int]:
    """The decoder's layer count and query heads per layer: a multimodal wrapper's (Gemma 3 4B and up, Gemma 4)
    from its text config, which is how AutoModelForCausalLM loads those checkpoints."""
    config = model.config.get_text_config()
    return getattr(config, "num_hidden_layers", None), getattr(config, "num_attention_heads", None)


def attention_modules(model: nn.Module) -> list[nn.Module]:
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


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers, wherever the model keeps it: the ModuleList whose i-th entry holds
    layer i's attention module. Found once per model (locate swaps stand-ins into the list later)."""
    if "headmap_decoder_layers" in model.__dict__:
        return model.__dict__["headmap_decoder_layers"]
    attention = attention_modules(model)
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) == len(attention) and all(
                any(sub is a for sub in layer.modules()) for layer, a in zip(m, attention)):
            model.__dict__["headmap_decoder_layers"] = m  # not a submodule: no second path to its weights
            return m
    raise UnsupportedModel(f"{type(model).__name__}: no list of decoder layers holds its attention modules in order")


@distributed.no_graph
def probe(model: nn.Module) -> dict:
    """One short forward per model, which every check reads: a right-padded batch of two rows, run with the masked
    attention switched on (no head masked), o_proj's input and each decoder layer's output watched. Raises
    UnsupportedModel when the model's own forward fails (nothing can be measured on it); otherwise records
    "unmaskable" (why zeroing a head's attention output is not zeroing its slice of o_proj's input, or None) and
    "layer_outputs", what each decoder layer returns (for locate's layer-by-layer advance): per layer, the tuple's
    length (None for a plain tensor), whether its entries after the hidden state hold anything, and the hidden
    state's shape. Run in eval mode (attention dropout would refuse masking), the model's mode restored after."""
    if "headmap_probe" in model.__dict__:
        return model.__dict__["headmap_probe"]
    arch = type(model).__name__
    device = next(model.parameters()).device
    ids = torch.arange(3, 15, device=device).repeat(2, 1) % model.config.get_text_config().vocab_size
    padding = torch.tensor([[1] * 12, [1] * 9 + [0] * 3], device=device)
    found = {"unmaskable": None, "layer_outputs": None}
    try:
        layers, modules = decoder_layers(model), attention_modules(model)
    except UnsupportedModel as err:
        found["unmaskable"], modules = str(err), None
    if modules is not None:
        read, outputs = {}, []
        hooks = [m.o_proj.register_forward_pre_hook(lambda o, args, i=m.layer_idx: read.__setitem__(i, args[0]))
                 for m in modules]
        hooks += [layer.register_forward_hook(lambda m, a, out: outputs.append(out)) for layer in layers]
        for m in modules:
            m.headmap_calls = []
        training = model.training
        try:
            with registered(model.eval(), modules, torch.zeros(layers_and_heads(model), dtype=torch.bool)):
                model(input_ids=ids, attention_mask=padding)
            found["unmaskable"] = _o_proj_problem(arch, modules, read)
            found["layer_outputs"] = [(len(out), any(x is not None for x in out[1:]), tuple(out[0].shape))
                                      if isinstance(out, tuple) else (None, False, tuple(out.shape)) for out in outputs]
        except UnsupportedModel as err:
            found["unmaskable"] = str(err)
        except Exception as err:  # noqa: BLE001 - the stock forward below tells whose failure it is
            first = error_summary(err)
            found["unmaskable"] = f"{arch}: its forward fails with head masking ({type(err).__name__}: {first})"
        finally:
            for hook in hooks:
                hook.remove()
            for m in modules:
                del m.headmap_calls
            model.train(training)
    if found["unmaskable"] is not None:  # the masked forward did not run through: does the model's own?
        try:
            model(input_ids=ids, attention_mask=padding)
        except Exception as err:  # noqa: BLE001 - whatever transformers raised, the user gets one line naming it
            import transformers
            first = error_summary(err)
            raise UnsupportedModel(f"{arch}: the stock model's own forward fails in transformers "
                                   f"{transformers.__version__} ({type(err).__name__}: {first}); nothing can be "
                                   "measured on it") from None
    model.__dict__["headmap_probe"] = found  # not an attribute nn.Module tracks
    return found


def _o_proj_problem(arch: str, modules: list[nn.Module], read: dict) -> str | None:
    """Why the probe's forward shows that masking a head's attention output is not masking o_proj's input, if so."""
    for m in modules:
        if len(m.headmap_calls) != 1:
            kind = "linear or recurrent attention" if not m.headmap_calls else "differential or custom attention"
            return (f"{arch}: the attention of layer {m.layer_idx} calls the attention interface "
                    f"{len(m.headmap_calls)} times per forward ({kind}); head masking is not supported on it")
        out, got = m.headmap_calls[0], read.get(m.layer_idx)
        if got is None or got.numel() != out.numel() or not torch.equal(got, out.reshape(got.shape)):
            return (f"{arch}: o_proj of layer {m.layer_idx} does not read the attention output as it is (a norm or "
                    "mixing comes between), so a masked head's slice of its input would not be zero; head masking "
                    "is not supported on it")
    return None


def check_maskable(model: nn.Module) -> None:
    """Refuse, before any masked compute, a model where zeroing a head's attention output is not zeroing its slice
    of o_proj's input (read from the probe)."""
    reason = probe(model)["unmaskable"]
    if reason is not None:
        raise UnsupportedModel(reason)


@contextmanager
def registered(model: nn.Module, modules: list[nn.Module], mask: torch.Tensor):
    """The masked attention switched on, each attention module holding its layer's slice of `mask`."""
    register()
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
def mask_heads(model: nn.Module, mask: torch.Tensor):
    """Run `model` with heads ablated inside the block: their outputs are zero in o_proj's input.

    The masked attention runs through transformers' AttentionInterface (the model's own forward is untouched).

    Args:
        model: a Hugging Face decoder.
        mask: bool, True = that head's output is zero: (layers, heads), one head set for every sequence, or
            (layers, batch, heads), one per sequence of the batch (circuit_mask builds one from a circuit).
    """
    modules = attention_modules(model)
    layers, heads = layers_and_heads(model)
    if mask.dtype != torch.bool or mask.dim() not in (2, 3) or mask.shape[0] != layers or mask.shape[-1] != heads:
        raise ValueError(f"head mask must be a bool tensor of shape ({layers}, {heads}) or ({layers}, batch, "
                         f"{heads}); got {mask.dtype} {tuple(mask.shape)}")
    check_maskable(model)
    with registered(model, modules, mask):
        yield model
