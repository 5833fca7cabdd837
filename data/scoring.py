"""Tokenisation, length-sorted batching and log-likelihood scoring of multiple-choice examples."""
import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from data.tasks import Example


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split the way lm-evaluation-harness splits them:
    encode the whole text and take the continuation as what follows the context's own tokens, so
    the continuation is tokenised exactly as the model reads it."""
    n_space = len(context) - len(context.rstrip())
    if n_space:  # a trailing space belongs to the continuation's first token
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    context_ids = tokenizer(context).input_ids
    whole_ids = tokenizer(context + continuation).input_ids
    return context_ids, whole_ids[len(context_ids):]


@dataclass
class Row:
    """One sequence to run, and the answer spans to read out of it."""
    ids: list[int]
    spans: list[tuple[int, int, int, list[int]]]  # (example, choice, position predicting the first target, targets)


def build_rows(tokenizer, examples: list[Example]) -> list[Row]:
    """One row per example when all its choices share the prompt and are single tokens (all choices are
    read from one forward pass of the prompt); otherwise one row per prompt + choice."""
    rows = []
    for e, ex in enumerate(examples):
        pairs = [encode_pair(tokenizer, p, c) for p, c in zip(ex.prompts, ex.continuations)]
        shared = all(ctx == pairs[0][0] for ctx, _ in pairs)
        if shared and all(len(cont) == 1 for _, cont in pairs):
            ctx = pairs[0][0]
            rows.append(Row(ctx, [(e, c, len(ctx) - 1, cont) for c, (_, cont) in enumerate(pairs)]))
        else:
            rows.extend(Row(ctx + cont, [(e, c, len(ctx) - 1, cont)]) for c, (ctx, cont) in enumerate(pairs))
    return rows


def batches(rows: list[Row], batch_size: int):
    """Longest first, so padding is small and an out-of-memory error shows up in the first batch."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].ids))
    for start in range(0, len(order), batch_size):
        yield [rows[i] for i in order[start:start + batch_size]]


def pad_right(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def answer_logprobs(model, ids: torch.Tensor, attention_mask: torch.Tensor, batch: list[Row]) -> list[float]:
    """log P(targets) for every span of the batch. The LM head runs only at the answer positions."""
    hidden = model.base_model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
    which_row, which_pos, targets, owner = [], [], [], []
    for r, row in enumerate(batch):
        for s, (_, _, first, tgt) in enumerate(row.spans):
            which_row += [r] * len(tgt)
            which_pos += range(first, first + len(tgt))
            targets += tgt
            owner += [(r, s)] * len(tgt)
    logits = model.get_output_embeddings()(hidden[which_row, which_pos]).float()
    token_lp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(targets, device=logits.device)[:, None])
    sums: dict[tuple[int, int], float] = {}
    for key, lp in zip(owner, token_lp[:, 0].tolist()):
        sums[key] = sums.get(key, 0.0) + lp
    return [sums[(r, s)] for r, row in enumerate(batch) for s in range(len(row.spans))]


@torch.inference_mode()
def score_examples(model, tokenizer, examples: list[Example], batch_size: int = 16,
                   progress: bool = True, desc: str = "scoring") -> list[list[float]]:
    """Summed log-likelihood of every choice of every example: scores[example][choice]."""
    rows = build_rows(tokenizer, examples)
    scores = [[math.nan] * len(ex.continuations) for ex in examples]
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    with tqdm(total=len(rows), desc=desc, disable=not progress, leave=False) as bar:
        for batch in batches(rows, batch_size):
            ids, mask = pad_right([r.ids for r in batch], pad, device)
            values = iter(answer_logprobs(model, ids, mask, batch))
            for row in batch:
                for e, c, _, _ in row.spans:
                    scores[e][c] = next(values)
            bar.update(len(batch))
    return scores


def accuracy(examples: list[Example], scores: list[list[float]]) -> dict:
    """acc: argmax of the log-likelihood; acc_norm: of the log-likelihood per character of the choice."""
    def argmax(xs):
        return max(range(len(xs)), key=xs.__getitem__)
    pred = [argmax(s) for s in scores]
    pred_norm = [argmax([v / max(1, len(c.strip())) for v, c in zip(s, ex.continuations)])
                 for s, ex in zip(scores, examples)]
    n = len(examples)
    return {"acc": sum(p == ex.gold for p, ex in zip(pred, examples)) / n,
            "acc_norm": sum(p == ex.gold for p, ex in zip(pred_norm, examples)) / n,
            "n": n, "predictions": pred, "predictions_norm": pred_norm}
