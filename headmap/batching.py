"""How rows of different lengths are batched, for locating, training and scoring alike: right padding, and batches
planned by length so that as little as possible runs on padding, within a budget of padded tokens (memory).
"""
import math

import torch

# A forward pass costs about this many tokens' work on top of its tokens (launches, per-layer overhead): a padded
# token is only worth saving when it costs more than starting another pass. Measured with `bench/step_vs_peft_trainer.py
# --pass-overhead N` (BENCHMARKS.md): on the 2-core CPU 64 was fastest of 16, 64, 256 and 1024; on an H100 a
# SmolLM2-135M HeadMap step took 0.12 s at 4096 and 1.83 s at 64, since a pass there is launch-bound and padded
# tokens are nearly free, so on a GPU a batch splits only to stay within the token budget.
PASS_OVERHEAD_TOKENS = {"cpu": 64, "cuda": 4096}


def pass_overhead_tokens(device) -> int:
    """PASS_OVERHEAD_TOKENS for `device`; an accelerator without its own entry is launch-bound like CUDA."""
    return PASS_OVERHEAD_TOKENS.get(torch.device(device).type, PASS_OVERHEAD_TOKENS["cuda"])


def length_groups(lengths: list[int], token_budget: int, pass_overhead: int) -> list[list[int]]:
    """Split rows of the given lengths, sorted longest first, into consecutive groups, each run as one right-padded
    pass: the split with the fewest padded tokens plus `pass_overhead` per pass, among those whose padded size
    (rows x longest row) fits `token_budget` (an exact dynamic programme; a row longer than the budget runs alone).
    Returns lists of row indices (into `lengths`)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    cost, start = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for first in range(end - 1, -1, -1):  # the last group is order[first:end], as wide as its first row
            size = (end - first) * lengths[order[first]]
            if size > token_budget and first < end - 1:
                break  # adding longer rows only grows it
            if cost[first] + size + pass_overhead < cost[end]:
                cost[end], start[end] = cost[first] + size + pass_overhead, first
    groups, end = [], len(order)
    while end:
        groups.append(order[start[end]:end])
        end = start[end]
    return groups[::-1]


def plan_batches(lengths: list[int], heads: int, token_budget: int, world: int = 1):
    """The (candidate head, sample) rows of one layer, cut into batches: rows of the longest samples first, each
    batch at most `token_budget` padded tokens (rows x its longest row; a single row may exceed it) and cut to its
    own longest row, so no layer runs on padding beyond it (right padding and a causal mask: cutting it off changes
    nothing). Under torchrun the ranks take turns along the batches. Returns (candidates, samples, width) per batch."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows = [(h, i) for i in order for h in range(heads)]
    batches, start = [], 0
    while start < len(rows):
        width, end = lengths[rows[start][1]], start + 1  # the first row is the batch's longest
        while end < len(rows) and (end - start + 1) * width <= token_budget:
            end += 1
        batches.append(([h for h, _ in rows[start:end]], [i for _, i in rows[start:end]], width))
        start = end
    return batches + [([], [], 0)] * (-len(batches) % world)  # as many as a multiple of the ranks


def pad_right(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences as one right-padded batch on `device`: input ids (rows, longest) and attention mask (1 = a real
    token). Right padding keeps every real token at its own position, so a batch can be cut to a shorter width."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    if torch.device(device).type == "cuda":  # from pinned memory the copy does not wait for the GPU's queue
        return ids.pin_memory().to(device, non_blocking=True), mask.pin_memory().to(device, non_blocking=True)
    return ids.to(device), mask.to(device)
