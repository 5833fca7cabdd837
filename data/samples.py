"""D, the samples locate scores every head on: the pool's examples the unmasked model answers correctly with the
lowest gold loss, as the token ids locate_circuit takes; and the gold and wrong answers the probe selector reads."""
import random
import sys

import torch

from data.common import Example
from data.files import DataError
from data.scoring import encode_pair, fit_context, metrics, score_continuations


def answer_samples(tokenizer, examples: list[Example], limit: int | None = None) -> list[tuple[torch.Tensor, int]]:
    """locate_circuit's samples: per example, prompt + gold continuation as token ids (the prompt cut to the model's
    `limit` positions, as scoring cuts it) and where the answer starts."""
    pairs = [encode_pair(tokenizer, ex.prompts[ex.gold], ex.continuations[ex.gold]) for ex in examples]
    pairs = [(fit_context(ctx, cont, limit, e)[0], cont) for e, (ctx, cont) in enumerate(pairs)]
    return [(torch.tensor(ctx + cont), len(ctx)) for ctx, cont in pairs]


def select_samples(model, tokenizer, task, examples, count, batch_size, progress=True) -> dict[str, list]:
    """The `count` examples the unmasked model answers correctly with the lowest gold loss: their indices and those
    losses (summed over the answer's tokens), in index order."""
    scores = score_continuations(model, tokenizer, examples, batch_size, progress, "choosing samples")
    correct = [i for i, right in enumerate(metrics(task.kind, examples, scores)["correct"]) if right]
    if not correct:
        raise DataError("the unmasked model answers no example of the pool correctly; try "
                         + ("--prompt harness, " if task.prompt == "paper" else "") + "another --split or a larger --pool")
    if len(correct) < count:
        print(f"warning: only {len(correct)} correct samples (asked for {count}); using them all", file=sys.stderr)
    return lowest_loss(correct, [-scores.logprob[i][examples[i].gold] for i in correct], count)


def lowest_loss(indices: list[int], losses: list[float], count: int) -> dict[str, list]:
    """The `count` of `indices` (in index order) with the lowest losses, ties to the lower index."""
    kept = sorted(sorted(range(len(indices)), key=lambda k: losses[k])[:count])
    return {"sample_indices": [indices[k] for k in kept], "sample_losses": [losses[k] for k in kept]}


def probe_pairs(tokenizer, examples: list[Example], seed: int,
                limit: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """What ITI's probes read (headmap.selectors.probe_scores): per example with two or more choices, prompt + gold
    answer and prompt + one wrong answer (drawn with `seed`), as token ids (the prompt cut to the model's `limit`
    positions, as scoring cuts it)."""
    draw, gold, wrong = random.Random(seed), [], []
    for e, ex in enumerate(examples):
        if len(ex.continuations) < 2:
            raise DataError(f"row {e} has one answer: a probe tells the gold answer from a wrong one")
        other = draw.choice([c for c in range(len(ex.continuations)) if c != ex.gold])
        for choice, into in ((ex.gold, gold), (other, wrong)):
            ctx, cont = encode_pair(tokenizer, ex.prompts[choice], ex.continuations[choice])
            into.append(torch.tensor(fit_context(ctx, cont, limit, e)[0] + cont))
    return gold, wrong
