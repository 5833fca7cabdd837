"""Activation checkpointing (train_adapter's activation_checkpointing, finetune.py's --activation-checkpointing): the
same losses and the same trained adapter as the plain run, dropout included (its random state replayed in the
recompute), for HeadMap MHA and HS, LoRA and DoRA, in one process and under torchrun --fsdp; and what it saves,
counted by torch's saved-tensor hooks."""
import json

import pytest
import torch

from headmap.adapters import attach_headmap, attach_lora
from headmap.train import batch_loss, checkpointed_layers, train_adapter
from tests.conftest import launch, tiny_llama

METHODS = {"headmap_mha": lambda m: attach_headmap(m, {0: [1, 2], 2: [0], 3: [3]}, rank=4),
           "headmap_hs": lambda m: attach_headmap(m, {1: [0, 3], 3: [2]}, rank=4, variant="hs"),
           "lora": lambda m: attach_lora(m, rank=4, alpha=8, dropout=0.2),
           "dora": lambda m: attach_lora(m, rank=4, alpha=8, dropout=0.2, dora=True)}


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 512, (4, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        mask[3, 6:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def trained(method, checkpointing):
    model = tiny_llama(layers=4).requires_grad_(False)
    torch.manual_seed(1)
    adapter = METHODS[method](model)
    adapter.train()
    train_data, held_out = batches(4), batches(1, seed=9)[0]
    torch.manual_seed(2)  # the dropout masks
    losses, records = [], []
    losses, _ = train_adapter(model, adapter, train_data, steps=4, lr=1e-2, warmup=1, token_budget=24,
                           eval_batch=held_out, eval_every=2, on_step=lambda record, _: records.append(record),
                           activation_checkpointing=checkpointing)
    return losses, [r.get("val_loss") for r in records], {k: v.clone() for k, v in adapter.state_dict().items()}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_checkpointed_training_gives_the_plain_runs_losses_and_adapter(method):
    plain, checkpointed = trained(method, False), trained(method, True)
    assert checkpointed[0] == pytest.approx(plain[0], rel=1e-6, abs=0)  # training losses, step by step
    assert checkpointed[1] == pytest.approx(plain[1], rel=1e-6, abs=0)  # validation losses
    assert plain[2].keys() == checkpointed[2].keys()
    for key in plain[2]:
        torch.testing.assert_close(checkpointed[2][key], plain[2][key], rtol=1e-6, atol=1e-7)
    assert plain[0][0] != plain[0][-1]  # it did train


def kept_for_backward(model, batch, checkpointing):
    """Bytes of the tensors autograd keeps for backward outside checkpointed regions, each counted once (the frozen
    weights, which it only references, left out), plus what checkpointing keeps itself: each layer's input."""
    weights = {p.data_ptr() for p in model.parameters()}
    seen = {}

    def keep(t):
        if t.data_ptr() not in weights:
            seen[(t.data_ptr(), tuple(t.shape))] = t.numel() * t.element_size()
        return t
    with checkpointed_layers(model, checkpointing), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        batch_loss(model, batch, backward=True)
    return sum(seen.values())


def test_checkpointing_keeps_a_fraction_and_layers_below_the_adapter_keep_nothing():
    model = tiny_llama(layers=4).requires_grad_(False)
    batch = batches(1)[0]
    adapter = attach_headmap(model, {layer: [0, 1] for layer in range(4)}, rank=4)
    plain, checkpointed = kept_for_backward(model, batch, False), kept_for_backward(model, batch, True)
    assert checkpointed < 0.5 * plain
    adapter.remove()
    top = attach_headmap(model, {3: [0, 1]}, rank=4)  # nothing to train below layer 3: those layers keep nothing
    only_top = kept_for_backward(model, batch, False)
    top.remove()
    one_layer = tiny_llama(layers=1).requires_grad_(False)
    attach_headmap(one_layer, {0: [0, 1]}, rank=4)
    assert only_top == kept_for_backward(one_layer, batch, False)  # as if the model had only the top layer


def test_sharded_lora_equals_one_process_checkpointed_by_default_or_not(tiny_folder, tmp_path):
    """--fsdp --method lora: the sharded run, checkpointed (--fsdp's default), equals one process (not checkpointed:
    the default without --fsdp), and the sharded run without checkpointing equals it to 1e-6. Dropout off: the ranks
    draw their own masks, so with dropout no two-process run equals one process (dropout under checkpointing is
    replayed exactly: the tests above)."""
    from tests.test_fsdp import check_adapters_and_logs, check_sharding
    args = ["finetune.py", "--model", tiny_folder, "--dataset", "arc_easy", "--method", "lora", "--dropout", "0",
            "--train-limit", "16", "--batch-size", "5", "--max-steps", "3", "--warmup", "1", "--eval-every", "3",
            "--val-limit", "4", "--eval-limit", "4", "--lr", "1e-2"]
    launch(*args, "--out", str(tmp_path / "one"))
    launch(*args, "--out", str(tmp_path / "on"), "--fsdp", processes=2)
    launch(*args, "--out", str(tmp_path / "off"), "--fsdp", "--no-activation-checkpointing", processes=2)
    records = [json.loads((tmp_path / n / "training.json").read_text()) for n in ("one", "on", "off")]
    assert [r["activation_checkpointing"] for r in records] == [False, True, False]
    assert [r["processes"] for r in records] == [1, 2, 2] and records[1]["method"] == "lora"
    check_sharding(records[1])
    logs = [[json.loads(line) for line in (tmp_path / n / "log.jsonl").read_text().splitlines()]
            for n in ("on", "off")]
    assert [e["loss"] for e in logs[0]] == pytest.approx([e["loss"] for e in logs[1]], rel=1e-6, abs=0)
    check_adapters_and_logs(tmp_path / "off", tmp_path / "on", steps=3)
    check_adapters_and_logs(tmp_path / "one", tmp_path / "on", steps=3)
