"""Layer-conditioned locating (HeadMap, Algorithm 1): the knowledge circuit of a task in a decoder.

    circuit, loss_matrix = locate_circuit(model, samples, heads_per_layer=8)

`samples` is D: a list of (input_ids, answer_start), input_ids a 1-D LongTensor holding prompt and gold answer, the
answer being input_ids[answer_start:]. For each layer l in order, with the heads already chosen in the layers below
masked, every head h of l is masked in turn and scored by the answers' NLL summed over their tokens and over D; the n
heads whose masking hurts most join the circuit.

The result is exact (a test compares it with one full masked forward per candidate); the speed comes from the
algorithm's structure: the layers below l are fixed while l is scored, so their output is kept and advanced one layer
at a time; the H candidates run through the layers above together, as rows of one batch with per-row head masks
(attention.py); the LM head runs only at the answer positions. Under torchrun (an initialised process group) each
rank runs its share of each layer's batches and the losses are summed.
"""
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from . import distributed
from .batching import pad_right, plan_batches
from .circuit import circuit_mask
from .masking import UnsupportedModel, check_maskable, decoder_layers, layers_and_heads, mask_heads, probe


class Samples:
    """D as one right-padded batch (on the model's device), each sample's length and its gold answer tokens: where
    each is predicted and the token itself (host lists, so that batches are planned without reading the GPU)."""

    def __init__(self, samples: list[tuple[torch.Tensor, int]], device: torch.device):
        rows = [ids.tolist() for ids, _ in samples]
        for (ids, start), row in zip(samples, rows):
            if not 1 <= start < len(row):
                raise ValueError(f"answer_start {start} leaves no prompt or no answer in a sample of {len(row)} tokens")
        self.lengths = [len(row) for row in rows]
        # right padding with any id: causal attention keeps it out of every real position, and batches are cut to
        # their longest row
        self.ids = pad_right(rows, 0, device)[0]  # (samples, longest)
        self.pos = [list(range(start - 1, len(row) - 1)) for (_, start), row in zip(samples, rows)]
        self.targets = [row[start:] for (_, start), row in zip(samples, rows)]


class AnswerIndex:
    """For rows that hold samples `rows` (host list), the flat answer tokens on the device: the row of each, its
    position, and the token. Built once and reused every layer, so the layer loop copies nothing to the GPU."""

    def __init__(self, samples: Samples, rows: list[int], device: torch.device):
        self.n_rows = len(rows)
        self.row = torch.tensor([r for r, s in enumerate(rows) for _ in samples.targets[s]], device=device)
        self.pos = torch.tensor([p for s in rows for p in samples.pos[s]], device=device)
        self.target = torch.tensor([t for s in rows for t in samples.targets[s]], device=device)


class StandIn(nn.Module):
    """Takes a decoder layer's place in the model's own forward: returns `kept`, the layer's known output, or
    with kept=None passes its input through; as a tuple padded with None where the layer returns a tuple
    (`width` entries). Other attributes (attention_type, ...) read as the layer's own."""

    def __init__(self, layer: nn.Module, kept: torch.Tensor | None, width: int | None):
        super().__init__()
        self.kept, self.width = kept, width
        self.__dict__["layer"] = layer  # not a submodule: the stand-in owns no weights

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states if self.kept is None else self.kept
        return out if self.width is None else (out,) + (None,) * (self.width - 1)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["layer"], name)


def check_locatable(model: nn.Module) -> None:
    """Raise UnsupportedModel, before any compute, for a model whose heads cannot be masked exactly, or whose decoder
    layers locate cannot drive one by one (read from the probe of what each layer returns: a layer that hands more
    than the hidden state to the next cannot stand in)."""
    if "headmap_layer_widths" in model.__dict__:
        return
    check_maskable(model)
    outputs = probe(model)["layer_outputs"]
    if any(extra for _, extra, _ in outputs):
        raise UnsupportedModel(f"{type(model).__name__}: its decoder layers hand more than the hidden state to the "
                               "next layer, which locate's layer-by-layer advance cannot keep")
    shapes = {shape for _, _, shape in outputs}
    hidden = model.config.get_text_config().hidden_size
    if len(shapes) != 1 or len(min(shapes)) != 3 or min(shapes)[-1] != hidden:  # Gemma 3n's AltUp stacks 4 streams
        raise UnsupportedModel(f"{type(model).__name__}: its decoder layers pass hidden states of shape "
                               f"{sorted(shapes)} to the next, not (batch, tokens, width), which locate's "
                               "layer-by-layer advance cannot keep")
    model.__dict__["headmap_layer_widths"] = [width for width, _, _ in outputs]


@contextmanager
def only_layers(model: nn.Module, first: int, last: int, kept: torch.Tensor | None = None):
    """Inside, the model's own forward runs decoder layers first..last-1 only: the layers below return `kept`
    (layer first-1's output on these rows), the layers from `last` on pass their input through. Every layer that
    runs gets what the model's forward gives it (masks and rotary embeddings per layer type, sliding windows),
    and the logits get every final transform the model applies (logit scaling, soft-capping)."""
    check_locatable(model)
    layers, widths = decoder_layers(model), model.__dict__["headmap_layer_widths"]
    real = list(layers)
    for i, layer in enumerate(real):
        if i < first or i >= last:
            layers[i] = StandIn(layer, kept if i < first else None, widths[i])
    try:
        yield
    finally:
        for i, layer in enumerate(real):
            layers[i] = layer


def layer_output(model: nn.Module, layer: int, run: Callable[[], object]) -> torch.Tensor:
    """What decoder layer `layer` returns while `run()` drives the model: (rows, tokens, hidden)."""
    got = []
    handle = decoder_layers(model)[layer].register_forward_hook(lambda m, a, out: got.append(out))
    try:
        run()
    finally:
        handle.remove()
    out = got[-1]
    # on the device of the model's inputs: with a device map, the layers sit on several devices
    return (out[0] if isinstance(out, tuple) else out).to(model.device)


def run_layers(model: nn.Module, ids: torch.Tensor, kept: torch.Tensor | None, first: int, last: int,
               mask: torch.Tensor) -> torch.Tensor:
    """Output of decoder layer last-1 on rows `ids` (rows, tokens): layers first..last-1 run with heads ablated by
    `mask` (layers, rows, heads); kept is layer first-1's output on these rows (None for first = 0: the embeddings)."""
    with mask_heads(model, mask), only_layers(model, first, last, kept):  # stand-ins hide layers: mask first
        # logits_to_keep=1: the LM head runs on one position; the answers' logits come from final_logits
        return layer_output(model, last - 1, lambda: model(input_ids=ids, logits_to_keep=1))


def final_logits(model: nn.Module, states: torch.Tensor) -> torch.Tensor:
    """Logits (n, vocab) of the model for last-layer hidden states (n, hidden), through the model's own forward:
    every decoder layer stands in for them, so its final norm, LM head and logit transforms run on these n positions
    only."""
    layers, _ = layers_and_heads(model)
    with only_layers(model, layers, layers, states[None]):
        ids = torch.zeros(1, len(states), dtype=torch.long, device=states.device)
        return model(input_ids=ids, logits_to_keep=0).logits[0].float()


def answer_loss(model: nn.Module, hidden: torch.Tensor, index: AnswerIndex) -> torch.Tensor:
    """Summed NLL (rows,) of the gold answer of each row of `hidden` (last-layer states), an AnswerIndex naming the
    answer tokens: logits at the answer positions only."""
    logits = final_logits(model, hidden[index.row, index.pos])
    nll = -torch.log_softmax(logits, dim=-1).gather(1, index.target[:, None])[:, 0]
    return torch.zeros(index.n_rows, device=hidden.device).index_add_(0, index.row, nll)


def default_token_budget(device: torch.device) -> int:
    """Padded tokens in one locating pass. A GPU pass is cheap per token only when it is large (bench/gpu_scale.py);
    on a CPU, passes of 512 to 2,048 tokens ran about 20% faster than 4,096 (BENCHMARKS.md, bench/locate_vs_naive_loop.py)."""
    return 65536 if device.type == "cuda" else 1024


@distributed.no_graph
def locate_circuit(model: nn.Module, samples: list[tuple[torch.Tensor, int]], heads_per_layer: int,
                   token_budget: int | None = None, on_layer: Callable[[dict], None] | None = None,
                   state: dict | None = None, progress: bool = False,
                   conditioned: bool = True) -> tuple[dict[int, list[int]], torch.Tensor]:
    """Locate the knowledge circuit of D = `samples`: the paper's Algorithm 1, layer by layer.

    Beside the H candidates of a layer one more row runs with no head of the layer masked: the loss with only the
    circuit below masked (the heat map's reference). Nothing in the layer loop waits for the GPU but the ranking of
    each layer's heads (ties go to the lower head index).

    Args:
        model: a Hugging Face decoder, in eval mode; it is not changed.
        samples: D, a list of (input_ids, answer_start): 1-D token ids of prompt + gold answer, and where the answer
            starts.
        heads_per_layer: n, the heads each layer adds to the circuit.
        token_budget: the most padded tokens (rows x longest row) in one pass; default: default_token_budget.
        on_layer: called with `state` after every layer (save it there to resume).
        state: {"circuit", "loss_matrix", "circuit_below_loss"} of the layers done so far (JSON-able): an
            interrupted run's continues it; an empty dict is filled in.
        progress: show a tqdm bar over the layers.
        conditioned: mask the circuit below while a layer is scored (the paper's conditioning). False scores every
            head masked alone, nothing else masked (the "independent" selector, at the same cost).

    Returns:
        (circuit {layer: sorted heads}, loss_matrix (layers, heads)): the summed answer loss with each head masked on
        top of the circuit below it (alone, when not conditioned).
    """
    check_locatable(model)
    layers, heads = layers_and_heads(model)
    if not 1 <= heads_per_layer < heads:
        raise ValueError(f"heads_per_layer must be in 1..{heads - 1} for a model with {heads} heads, got "
                         f"{heads_per_layer}")
    device = next(model.parameters()).device
    d = Samples(samples, device)
    budget = token_budget or default_token_budget(device)
    state = state if state is not None else {}
    for key in ("loss_matrix", "circuit_below_loss"):
        state.setdefault(key, [])
    state.setdefault("circuit", {})
    circuit = {int(k): v for k, v in state["circuit"].items()}
    done = len(state["loss_matrix"])
    hidden = None  # the kept output of the layers below the current one (None: below layer 0)

    def advance(hidden, layer):  # the kept input of the next layer: `layer` run once, its circuit heads masked
        chosen = {layer: circuit[layer]} if conditioned else {}
        mask = circuit_mask(chosen, layers, heads)[:, None].expand(layers, len(d.ids), heads)
        return run_layers(model, d.ids, hidden, layer, layer + 1, mask.to(device))

    for layer in range(done):  # resume: replay the finished layers
        hidden = advance(hidden, layer)
    plan = plan_batches(d.lengths, heads + 1, budget, distributed.world())  # candidate H: no head
    # under FSDP every rank runs as many passes as the others, of the same layers: the plan's empty batches (it
    # fills up to a multiple of the ranks) run as one row of sample 0, "no head", whose loss is not added
    sharded = distributed.sharded(model)
    batches = [(b, torch.tensor(c or [heads], device=device), torch.tensor(s or [0], device=device),
                width or d.lengths[0], AnswerIndex(d, s or [0], device), bool(c))
               for b, (c, s, width) in distributed.mine(list(enumerate(plan))) if c or sharded]
    for layer in tqdm(range(done, layers), desc="locating", initial=done, total=layers, disable=not progress):
        # one row per batch, summed over the ranks and then over the rows: the same sum in any number of processes
        loss = torch.zeros(len(plan), heads + 1, device=device)
        for b, c, s, width, index, real in batches:
            mask = torch.zeros(layers, len(c), heads + 1, dtype=torch.bool, device=device)
            mask[layer, torch.arange(len(c), device=device), c] = True  # row r masks its own candidate
            out = run_layers(model, d.ids[s, :width], None if hidden is None else hidden[s, :width], layer,
                             layers, mask[..., :heads])  # column H, "no head", masks nothing
            losses = answer_loss(model, out, index)
            if real:
                loss[b].index_add_(0, c, losses)
        loss = distributed.all_sum(loss).sum(0).tolist()
        circuit[layer] = top_heads(loss[:heads], heads_per_layer)
        state["circuit"][str(layer)] = circuit[layer]
        state["loss_matrix"].append(loss[:heads])
        state["circuit_below_loss"].append(loss[heads])
        hidden = advance(hidden, layer)
        if on_layer is not None:
            on_layer(state)
    return circuit, torch.tensor(state["loss_matrix"])


def top_heads(scores: list[float], n: int) -> list[int]:
    """The n heads of a layer with the highest scores (ties to the lower index), sorted: how every selector picks."""
    return sorted(sorted(range(len(scores)), key=lambda h: (-scores[h], h))[:n])


@distributed.no_graph
def unmasked_answer_loss(model: nn.Module, samples: list[tuple[torch.Tensor, int]]) -> float:
    """The answers' NLL summed over D with no head masked: the reference of locate's loss matrix."""
    layers, heads = layers_and_heads(model)
    d = Samples(samples, next(model.parameters()).device)
    nothing = torch.zeros(layers, len(d.ids), heads, dtype=torch.bool, device=d.ids.device)
    hidden = run_layers(model, d.ids, None, 0, layers, nothing)
    return answer_loss(model, hidden, AnswerIndex(d, list(range(len(d.ids))), hidden.device)).sum().item()
