"""Slow, obviously correct references that the fast paths are tested (and benchmarked) against."""
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


def ablate_with_hooks(model, heads_by_layer: dict[int, list[int]]):
    """Independent of kernels/: the stock model, with forward pre-hooks that zero the masked heads' columns of
    each o_proj input. Returns the hook handles (remove them when done)."""
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    head_dim = getattr(model.config, "head_dim", None) or head_dim
    handles = []
    for layer, heads in heads_by_layer.items():
        def zero(module, args, heads=heads):
            x = args[0].clone()
            for h in heads:
                x[..., h * head_dim:(h + 1) * head_dim] = 0
            return (x,)
        handles.append(model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(zero))
    return handles


@torch.inference_mode()
def locate_brute_force(model, tokenizer, examples, n):
    """Algorithm 1 the naive way: for every candidate of every layer, one full forward pass of the stock model
    over all samples (right-padded), with the circuit so far and the candidate zeroed by hooks."""
    from data.scoring import pad_right
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    device = next(model.parameters()).device
    pairs = [encode_pair(tokenizer, ex.prompts[ex.gold], ex.continuations[ex.gold]) for ex in examples]
    ids, attention = pad_right([ctx + cont for ctx, cont in pairs], 0, device)
    circuit, loss_matrix = {}, []
    for layer in range(layers):
        losses = []
        for h in range(heads):
            handles = ablate_with_hooks(model, {**circuit, layer: [h]})
            logp = torch.log_softmax(model(ids, attention_mask=attention).logits.float(), -1)
            for handle in handles:
                handle.remove()
            losses.append(-sum(logp[i, len(ctx) - 1 + k, t].item()
                               for i, (ctx, cont) in enumerate(pairs) for k, t in enumerate(cont)))
        circuit[layer] = sorted(sorted(range(heads), key=lambda h: (-losses[h], h))[:n])
        loss_matrix.append(losses)
    return circuit, loss_matrix
