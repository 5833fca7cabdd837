"""The naive loops a user would write: one full forward per choice, per candidate head. Slow and obviously correct,
they are what the fast paths are tested against (tests/) and benchmarked against (bench/)."""
import torch

from data.scoring import encode_pair


@torch.inference_mode()
def choice_scores_one_by_one(model, tokenizer, examples) -> list[list[float]]:
    """One full forward pass of the stock model per (prompt, choice), no batching, no padding."""
    device = next(model.parameters()).device
    scores = []
    for ex in examples:
        row = []
        for prompt, continuation in zip(ex.prompts, ex.continuations):
            ctx, cont = encode_pair(tokenizer, prompt, continuation)
            ids = torch.tensor([ctx + cont], device=device)
            logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            row.append(sum(logprobs[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont)))
        scores.append(row)
    return scores


def o_proj_of(layer):
    """The output projection of a decoder layer's attention, found by name (no headmap/ code involved)."""
    return next(m for name, m in layer.named_modules() if name.endswith("o_proj"))


def ablate_with_hooks(model, mask):
    """Independent of headmap/: the stock model, with forward pre-hooks that zero the masked heads' columns of
    each o_proj input. `mask` is {layer: [heads]} or a bool tensor (layers, heads) or (layers, batch, heads).
    Returns the hook handles (remove them when done)."""
    config = model.config.get_text_config()  # a multimodal wrapper: its decoder's
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    if isinstance(mask, dict):
        dense = torch.zeros(layers, heads, dtype=torch.bool)
        for layer, hs in mask.items():
            dense[layer, hs] = True
        mask = dense
    handles = []
    decoder = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == layers)
    for i, layer in enumerate(decoder):
        o_proj = o_proj_of(layer)

        def zero(module, args, rows=mask[i]):
            x = args[0]
            head_dim = x.shape[-1] // heads  # from the input: not every o_proj is an nn.Linear (Moshi's)
            rows = rows.expand(x.shape[0], heads) if rows.dim() == 1 else rows  # (batch, heads)
            keep = (~rows.to(x.device)).repeat_interleave(head_dim, dim=-1)[:, None, :]
            return (x * keep,)
        handles.append(o_proj.register_forward_pre_hook(zero))
    return handles


@torch.inference_mode()
def locate_brute_force(model, tokenizer, examples, n):
    """Algorithm 1 the naive way: for every candidate of every layer (and for "no head of the layer"), one full
    forward pass of the stock model over all samples (right-padded), with the circuit so far and the candidate
    zeroed by hooks. Returns (circuit, loss matrix, loss with only the circuit below each layer masked)."""
    from headmap.batching import pad_right
    config = model.config.get_text_config()  # a multimodal wrapper: its decoder's
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    device = next(model.parameters()).device
    pairs = [encode_pair(tokenizer, ex.prompts[ex.gold], ex.continuations[ex.gold]) for ex in examples]
    ids, attention = pad_right([ctx + cont for ctx, cont in pairs], 0, device)
    circuit, loss_matrix, below = {}, [], []
    for layer in range(layers):
        losses = []
        for h in [*range(heads), None]:
            handles = ablate_with_hooks(model, {**circuit, layer: [] if h is None else [h]})
            logp = torch.log_softmax(model(ids, attention_mask=attention).logits.float(), -1)
            for handle in handles:
                handle.remove()
            losses.append(-sum(logp[i, len(ctx) - 1 + k, t].item()
                               for i, (ctx, cont) in enumerate(pairs) for k, t in enumerate(cont)))
        below.append(losses.pop())
        circuit[layer] = sorted(sorted(range(heads), key=lambda h: (-losses[h], h))[:n])
        loss_matrix.append(losses)
    return circuit, loss_matrix, below
