"""HeadMap's library: copy this folder into any codebase, under any name; it imports nothing of the scripts.

    circuit, losses = locate_circuit(model, samples, 8); adapter = attach_headmap(model, circuit)
    train_adapter(model, adapter, batches, steps, lr); save_adapter(adapter, folder)

    attention.py    the masked-attention Triton kernel (and its PyTorch reference)
    masking.py      mask_heads(model, mask): ablate heads per sequence through transformers' AttentionInterface
    locate.py       locate_circuit: layer-conditioned locating (the paper's Algorithm 1)
    selectors.py    other ways of choosing heads (each head alone, attribution patching, ITI's probes, LoFiT, random)
    circuit.py      knowledge circuits: the file format, head masks, random circuits of the same shape
    adapters.py     HeadMap, LoRA and DoRA adapters: the modules, attached through forward hooks
    saving.py       save_adapter, load_adapter: adapters in PEFT's file layout
    merging.py      merge_adapter: an adapter folded into the base weights
    train.py        train_adapter: the AdamW loop (schedule, clipping, micro-batches, resume, torchrun)
    batching.py     right padding, and batches planned by length within a token budget (locate, train, scoring)
    distributed.py  the rank, share and sums under torchrun
    files.py        the atomic writer its files go through, the checked reader of a file handed over
    errors.py       its exceptions (UnsupportedModel, NoSpaceError, UnreadableFile) and an error's one-line reason

The names below load their module on first use, so that importing one light module (files.py) does not load
torch and transformers.
"""
import importlib

_EXPORTS = {
    "attention": ["masked_attention", "masked_attention_reference"],
    "masking": ["mask_heads", "layers_and_heads"],
    "locate": ["locate_circuit", "unmasked_answer_loss"],
    "selectors": ["attribution_scores", "independent_scores", "probe_scores", "lofit_scores", "random_scores",
                  "circuit_from_scores", "global_circuit", "rank_correlation"],
    "circuit": ["read_circuit", "circuit_from", "circuit_entry", "check_circuit", "circuit_mask", "random_circuit_like"],
    "adapters": ["attach_headmap", "attach_lora"],
    "saving": ["save_adapter", "load_adapter"],
    "merging": ["merge_adapter"],
    "train": ["train_adapter", "batch_loss", "summed_nll", "checkpointed_layers", "offloaded_activations"],
    "files": ["atomic"],
    "errors": ["UnsupportedModel", "NoSpaceError"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)


def __dir__() -> list[str]:
    return __all__
