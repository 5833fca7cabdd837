"""Ways of choosing a task's heads other than Algorithm 1, to compare with it: each gives a (layers, heads) score
matrix, higher = more important, and every selector picks its circuit the same way (circuit_from_scores: the n
highest of each layer, ties to the lower head).

    scores = attribution_scores(model, samples)          # one forward and one backward for every head at once
    scores = independent_scores(model, samples)          # every head masked alone, exactly (locate's engine)
    scores = probe_scores(model, gold, wrong)            # ITI's linear probes: cross-validated accuracy per head
    scores = lofit_scores(model, batches, steps)         # LoFiT's first stage: L1-penalised scaling of each head
    circuit = circuit_from_scores(scores, n)

`samples` is D as locate_circuit takes it: (input_ids, answer_start) per sample. independent_scores and
attribution_scores are in the units of locate's loss matrix (the answers' NLL summed over their tokens and over D):
the loss with the head masked alone, and the first-order estimate of what masking it alone adds to it; a probe's
score is its held-out accuracy, LoFiT's the norm of the head's learned scaling.
"""
import torch
from torch import nn

from . import distributed
from .batching import length_groups, pad_right, pass_overhead_tokens
from .locate import (AnswerIndex, Samples, answer_loss, check_locatable, default_token_budget, layer_output,
                     locate_circuit, top_heads)
from .masking import attention_modules, layers_and_heads
from .train import train_adapter


def circuit_from_scores(scores: torch.Tensor, n: int) -> dict[int, list[int]]:
    """{layer: the n heads of the highest scores, sorted} for a (layers, heads) score matrix."""
    return {layer: top_heads(row, n) for layer, row in enumerate(scores.tolist())}


def global_circuit(scores: torch.Tensor | list, k: int) -> dict[int, list[int]]:
    """{layer: heads} of the k highest of a (layers, heads) score matrix over the whole model (ties to the lower
    layer, then head): how ITI and LoFiT pick, beside the per-layer pick every selector here shares."""
    scores = torch.as_tensor(scores)
    heads = scores.shape[1]
    flat = scores.flatten().tolist()
    chosen = sorted(sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:k])
    circuit: dict[int, list[int]] = {}
    for i in chosen:
        circuit.setdefault(i // heads, []).append(i % heads)
    return circuit


def independent_scores(model: nn.Module, samples: list[tuple[torch.Tensor, int]], token_budget: int | None = None,
                       **locate_options) -> torch.Tensor:
    """(layers, heads): the answers' NLL summed over D with each head masked alone, nothing else masked. Exact, and
    as fast as locate_circuit (the layers below a candidate run once); `locate_options` are its on_layer, state and
    progress (a resumable run)."""
    heads = layers_and_heads(model)[1]  # any n will do: unconditioned, the circuit it picks changes no score
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
                scores[layer] += effect.reshape(*x.shape[:-1], heads, -1).sum(dim=(0, 1, 3)).to(device)
            inputs.clear()
    finally:
        for hook in hooks:
            hook.remove()
    return distributed.all_sum(scores).float()


@distributed.no_graph
def head_outputs(model: nn.Module, sequences: list[torch.Tensor], token_budget: int | None = None) -> torch.Tensor:
    """(sequences, layers, heads, head_dim): every head's slice of o_proj's input at each sequence's last token, what
    the head writes there (float32, on the host). Sequences are 1-D token ids, run right-padded in batches of at
    most `token_budget` padded tokens."""
    check_locatable(model)
    layers, heads = layers_and_heads(model)
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in sequences]
    ids_all = pad_right([ids.tolist() for ids in sequences], 0, device)[0]
    out: list[torch.Tensor | None] = [None] * len(sequences)
    seen: dict[int, torch.Tensor] = {}
    hooks = [m.o_proj.register_forward_pre_hook(lambda mod, args, i=m.layer_idx: seen.__setitem__(i, args[0]))
             for m in attention_modules(model)]
    try:
        for rows in length_groups(lengths, token_budget or default_token_budget(device), pass_overhead_tokens(device)):
            width = max(lengths[r] for r in rows)
            model(input_ids=ids_all[rows, :width], logits_to_keep=1)
            last = torch.tensor([lengths[r] - 1 for r in rows], device=device)
            picked = torch.stack([seen[layer][torch.arange(len(rows), device=device), last.to(seen[layer].device)]
                                  .to(device) for layer in range(layers)], dim=1)  # (rows, layers, width)
            for k, r in enumerate(rows):
                out[r] = picked[k].reshape(layers, heads, -1).float().cpu()
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(out)


def probe_accuracy(gold: torch.Tensor, wrong: torch.Tensor, folds: int = 4, c: float = 1.0) -> torch.Tensor:
    """(layers, heads): each head's cross-validated accuracy at telling `gold` from `wrong` features (both (rows,
    layers, heads, head_dim), row i of each from the same example) with a logistic regression, ITI's probe.

    Per head and fold: features standardised on the training folds, then the L2-regularised logistic regression
    (sklearn's objective: C * the summed log-loss + |w|^2 / 2, the bias not penalised) fitted by L-BFGS on the
    training rows, scored on the held-out ones; the examples are split into `folds` contiguous folds, an example's
    gold and wrong rows kept together. All heads are fitted at once (independent problems, one summed objective)."""
    rows, layers, heads, width = gold.shape
    if rows < folds:
        raise ValueError(f"a probe needs at least {folds} examples (one per fold), got {rows}")
    x = torch.cat([gold, wrong]).double().reshape(2 * rows, layers * heads, width).transpose(0, 1)  # (P, 2N, d)
    y = torch.cat([torch.ones(rows), torch.zeros(rows)]).double()
    example = torch.cat([torch.arange(rows), torch.arange(rows)])
    correct = torch.zeros(layers * heads, dtype=torch.float64)
    for fold in range(folds):
        held = (example * folds // rows) == fold
        train_x, test_x = x[:, ~held], x[:, held]
        mean, sd = train_x.mean(1, keepdim=True), train_x.std(1, keepdim=True).clamp_min(1e-8)
        train_x, test_x = (train_x - mean) / sd, (test_x - mean) / sd
        w = torch.zeros(layers * heads, width, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(layers * heads, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                                      line_search_fn="strong_wolfe")

        def objective():
            optimizer.zero_grad()
            logits = torch.einsum("pnd,pd->pn", train_x, w) + b[:, None]
            loss = c * torch.nn.functional.binary_cross_entropy_with_logits(
                logits, y[~held].expand_as(logits), reduction="sum") + 0.5 * (w * w).sum()
            loss.backward()
            return loss
        with torch.enable_grad():
            optimizer.step(objective)
        with torch.no_grad():
            predicted = (torch.einsum("pnd,pd->pn", test_x, w) + b[:, None]) > 0
            correct += (predicted == y[held].bool()).sum(1)
    return (correct / (2 * rows)).float().reshape(layers, heads)


def probe_scores(model: nn.Module, gold: list[torch.Tensor], wrong: list[torch.Tensor], folds: int = 4,
                 c: float = 1.0, token_budget: int | None = None) -> torch.Tensor:
    """(layers, heads): ITI's per-head linear probes, each head's cross-validated accuracy (probe_accuracy) at
    telling the gold answer from a wrong one by what the head writes at the answer's last token. `gold[i]` and
    `wrong[i]` are one example's prompt + gold answer and prompt + a wrong answer, as 1-D token ids."""
    if len(gold) != len(wrong):
        raise ValueError(f"{len(gold)} gold sequences but {len(wrong)} wrong ones; pass one of each per example")
    return probe_accuracy(head_outputs(model, gold, token_budget), head_outputs(model, wrong, token_budget), folds, c)


class HeadScales(nn.Module):
    """LoFiT's first-stage adapter: every head's output (its slice of o_proj's input) scaled element-wise by 1 + a,
    one vector a per head, zero at first (the identity). Attached by forward pre-hooks on o_proj; remove() detaches
    it. The interface train_adapter trains (parameters, state_dict, train/eval)."""
    method = "lofit head scales"

    def __init__(self, model: nn.Module):
        super().__init__()
        heads = layers_and_heads(model)[1]
        modules = attention_modules(model)
        device = next(model.parameters()).device  # per layer its own width: Gemma 4's global layers are wider
        self.scales = nn.ParameterList(torch.zeros(heads, m.o_proj.in_features // heads, device=device)
                                       for m in modules)
        self.handles = [m.o_proj.register_forward_pre_hook(
            lambda mod, args, i=m.layer_idx: (self.scaled(i, args[0]),) + tuple(args[1:])) for m in modules]

    def scaled(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        factor = (1 + self.scales[layer]).to(x.dtype)  # (heads, head_dim)
        return (x.reshape(*x.shape[:-1], *factor.shape) * factor).reshape(x.shape)

    def l1(self) -> torch.Tensor:
        return sum(a.abs().sum() for a in self.scales)

    def norms(self) -> torch.Tensor:
        """(layers, heads): the norm of each head's vector."""
        return torch.stack([a.detach().float().norm(dim=-1).cpu() for a in self.scales])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def lofit_scores(model: nn.Module, batches, steps: int, lr: float = 5e-3, l1: float = 1e-3,
                 token_budget: int = 4096, seed: int = 0, progress: bool = False) -> torch.Tensor:
    """(layers, heads): LoFiT's first stage, the norm of each head's learned scaling vector. A vector per head scales
    its output by 1 + a (HeadScales); all are trained together on the task loss plus `l1` times their summed
    absolute values (LoFiT's L1 penalty), through train_adapter, for `steps` steps of `batches` (Hugging Face
    batches, as train_adapter takes them) at learning rate `lr` with no warm-up; the heads that the penalty lets
    move are the ones the task needs. The model is left as it was (frozen while the scales train)."""
    torch.manual_seed(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)
    scales = HeadScales(model)
    try:
        scales.train()
        train_adapter(model, scales, batches, steps, lr, token_budget=token_budget, seed=seed, progress=progress,
                      penalty=lambda: l1 * scales.l1())
        return scales.norms()
    finally:
        scales.remove()
        for p in trainable:
            p.requires_grad_(True)


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
