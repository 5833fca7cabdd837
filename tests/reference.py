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
