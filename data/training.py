"""finetune's rows as the loop takes them: the protocol's training texts as token ids, right-padded batches in
Hugging Face's convention, one batch per optimizer step of each shuffled epoch."""
import torch

from data.common import Example
from headmap.batching import pad_right


def training_texts(tokenizer, examples: list[Example], max_length: int) -> list[list[int]]:
    """The protocol's training sequences: prompt + gold answer + EOS as token ids, cut at `max_length` tokens."""
    eos = tokenizer.eos_token_id
    return [(tokenizer(ex.train_text).input_ids + [eos])[:max_length] for ex in examples]


def lm_batch(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Token sequences as one right-padded batch in Hugging Face's convention (train_adapter's): input_ids,
    attention_mask, and labels = input_ids with the padding -100. On the host; the loop moves its micro-batches."""
    ids, mask = pad_right(seqs, pad_id, "cpu")
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def epoch_batches(seqs: list[list[int]], pad_id: int, batch_size: int, epochs: int, seed: int):
    """One lm_batch per optimizer step: `batch_size` rows at a time of each epoch's order, shuffled with seed + epoch."""
    for epoch in range(epochs):
        order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for start in range(0, len(seqs), batch_size):
            yield lm_batch([seqs[i] for i in order[start:start + batch_size]], pad_id)
