"""Ways of choosing a task's heads other than Algorithm 1, to compare with it: each gives a (layers, heads) score
matrix, higher = more important, and every selector picks its circuit the same way (circuit_from_scores: the n
highest of each layer, ties to the lower head).

    scores = attribution_scores(model, samples)          # one forward and one backward for every head at once
    scores = independent_scores(model, samples)          # every head masked alone, exactly (locate's engine)
    circuit = circuit_from_scores(scores, n)

`samples` is D as locate_circuit takes it: (input_ids, answer_start) per sample. The scores are in the units of
locate's loss matrix (the answers' NLL summed over their tokens and over D): independent_scores is that loss with
the head masked alone, attribution_scores the first-order estimate of what masking it alone adds to it.
"""
import torch
from torch import nn

from . import distributed
from .batching import length_groups, pass_overhead_tokens
from .locate import (AnswerIndex, Samples, answer_loss, check_locatable, default_token_budget, layer_output,
                     locate_circuit, top_heads)
from .masking import attention_modules, layers_and_heads


def circuit_from_scores(scores: torch.Tensor, n: int) -> dict[int, list[int]]:
    """{layer: the n heads of the highest scores, sorted} for a (layers, heads) score matrix."""
    return {layer: top_heads(row, n) for layer, row in enumerate(scores.tolist())}


def independent_scores(model: nn.Module, samples: list[tuple[torch.Tensor, int]], token_budget: int | None = None,
                       **locate_options) -> torch.Tensor:
    """(layers, heads): the answers' NLL summed over D with each head masked alone, nothing else masked. Exact, and
    as fast as locate_circuit (the layers below a candidate run once); `locate_options` are its on_layer, state and
    progress (a resumable run)."""
    heads = layers_and_heads(model)[1]
    return locate_circuit(model, samples, max(1, heads // 4), token_budget, conditioned=False, **locate_options)[1]


def attribution_scores(model: nn.Module, samples: list[tuple[torch.Tensor, int]],
                       token_budget: int | None = None) -> torch.Tensor:
    """(layers, heads): attribution patching's estimate of what masking each head alone adds to the answers' NLL
    summed over D: -x_h . dL/dx_h, x_h the head's slice of o_proj's input, summed over positions and samples (the
    first-order change of L when x_h goes to zero). One forward and one backward through the model's own forward
    per batch of samples (at most `token_budget` padded tokens); the model's weights need no gradient.

    A model sharded with FSDP is refused (ValueError): its ranks would run different numbers of passes."""
    check_locatable(model)
    if distributed.sharded(model):
        raise ValueError("attribution_scores does not take a model sharded with FSDP yet; run it on one process per "
                         "model copy (data parallel) or a device map")
    layers, heads = layers_and_heads(model)
    device = next(model.parameters()).device
    d = Samples(samples, device)
    groups = length_groups(d.lengths, token_budget or default_token_budget(device), pass_overhead_tokens(device))
    scores = torch.zeros(layers, heads, dtype=torch.float64, device=device)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [m.o_proj.register_forward_pre_hook(lambda mod, args, i=m.layer_idx: inputs.__setitem__(i, args[0]))
             for m in attention_modules(model)]
    try:
        for rows in distributed.mine(groups):
            width = max(d.lengths[r] for r in rows)
            with torch.enable_grad():  # the weights stay frozen: the graph starts at the embeddings
                embeds = model.get_input_embeddings()(d.ids[rows, :width]).detach().requires_grad_(True)
                hidden = layer_output(model, layers - 1, lambda: model(inputs_embeds=embeds, logits_to_keep=1))
                loss = answer_loss(model, hidden, AnswerIndex(d, rows, device)).sum()
                xs = [inputs[layer] for layer in range(layers)]
                grads = torch.autograd.grad(loss, xs)
            for layer, (x, g) in enumerate(zip(xs, grads)):
                effect = -(x.detach().double() * g.double())
                scores[layer] += effect.reshape(*x.shape[:-1], heads, -1).sum(dim=(0, 1, 3))
            inputs.clear()
    finally:
        for hook in hooks:
            hook.remove()
    return distributed.all_sum(scores).float()


def random_scores(layers: int, heads: int, seed: int) -> torch.Tensor:
    """(layers, heads) uniform draws with `seed`: the control, a random circuit through the same pick."""
    return torch.rand(layers, heads, generator=torch.Generator().manual_seed(seed))


def rank_correlation(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two score lists (ties share their mean rank): how far one selector's ranking
    of the heads agrees with another's (1: the same order, 0: unrelated, -1: reversed)."""
    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        r = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return torch.tensor(r, dtype=torch.float64)
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.norm() * rb.norm()).item()
    return (ra @ rb).item() / denominator if denominator else 0.0
