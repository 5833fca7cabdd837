"""Activation checkpointing and the chunked loss (train_adapter's activation_checkpointing and loss_chunks,
finetune.py's --activation-checkpointing and --loss-chunks): the same losses and the same trained adapter as the
plain run, dropout included (its random state replayed in the recompute), for HeadMap MHA and HS, LoRA and DoRA, in
one process and under torchrun --fsdp (the embeddings and the LM head sharded apart); and what they save, counted
by torch's saved-tensor hooks."""
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


def trained(method, checkpointing, loss_chunks=1, offload=False):
    model = tiny_llama(layers=4).requires_grad_(False)
    torch.manual_seed(1)
    adapter = METHODS[method](model)
    adapter.train()
    train_data, held_out = batches(4), batches(1, seed=9)[0]
    torch.manual_seed(2)  # the dropout masks
    losses, records = [], []
    losses, _ = train_adapter(model, adapter, train_data, steps=4, lr=1e-2, warmup=1, token_budget=24,
                           eval_batch=held_out, eval_every=2, on_step=lambda record, _: records.append(record),
                           activation_checkpointing=checkpointing, loss_chunks=loss_chunks,
                           offload_activations=offload)
    return losses, [r.get("val_loss") for r in records], {k: v.clone() for k, v in adapter.state_dict().items()}


@pytest.mark.parametrize("checkpointing, loss_chunks, offload", [(True, 1, False), (False, 5, False), (True, 7, True)])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_checkpointed_chunked_or_offloaded_training_gives_the_plain_runs_losses_and_adapter(method, checkpointing,
                                                                                        loss_chunks, offload):
    """7 chunks of a 12-token micro-batch: some slices are empty, as the ranks' shorter passes have them. Losses
    within 1e-6 relative either way; the adapter within 1e-7 checkpointed alone (bit for bit in practice), within
    1e-5 with the loss in chunks: the LM head's product over a slice rounds apart from the whole's (last bits), and
    AdamW, which divides each gradient by its own running size, turns a near-zero gradient's last bits (LoRA's A
    starts with none: B is zero) into differences of a few 1e-6 against updates of 4e-2."""
    plain, checkpointed = trained(method, False), trained(method, checkpointing, loss_chunks, offload)
    rtol, atol = (1e-6, 1e-7) if loss_chunks == 1 else (1e-5, 1e-5)
    assert checkpointed[0] == pytest.approx(plain[0], rel=1e-6, abs=0)  # training losses, step by step
    assert checkpointed[1] == pytest.approx(plain[1], rel=1e-6, abs=0)  # validation losses
    assert plain[2].keys() == checkpointed[2].keys()
    for key in plain[2]:
        torch.testing.assert_close(checkpointed[2][key], plain[2][key], rtol=rtol, atol=atol)
    assert plain[0][0] != plain[0][-1]  # it did train


def kept_for_backward(model, batch, checkpointing, loss_chunks=1):
    """The most bytes autograd holds for backward at once in one training pass of `batch`: the tensors saved and
    not yet freed, each counted once (the frozen weights, which it only references, left out); checkpointing's
    own saves, each layer's input, included."""
    weights = {p.data_ptr() for p in model.parameters()}
    holders, live, peak = {}, [0], [0]

    class Held:  # one saved tensor, for as long as autograd holds it
        def __init__(self, t):
            self.t, self.key = t, (t.data_ptr(), tuple(t.shape))
            if self.key[0] not in weights:
                if not holders.get(self.key):
                    live[0] += t.numel() * t.element_size()
                    peak[0] = max(peak[0], live[0])
                holders[self.key] = holders.get(self.key, 0) + 1

        def __del__(self):
            if self.key[0] not in weights:
                holders[self.key] -= 1
                if not holders[self.key]:
                    live[0] -= self.t.numel() * self.t.element_size()
    with checkpointed_layers(model, checkpointing), torch.autograd.graph.saved_tensors_hooks(Held, lambda h: h.t):
        batch_loss(model, batch, backward=True, loss_chunks=loss_chunks)
    return peak[0]


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


def untied_copy(folder, out):
    """The model of `folder` (tied embeddings) with its LM head a weight of its own (the same values), and its
    tokenizer: under --fsdp its embeddings and LM head are units of their own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tied = AutoModelForCausalLM.from_pretrained(folder)
    tied.config.tie_word_embeddings = False
    untied = type(tied)(tied.config)
    untied.load_state_dict({k: v.clone() for k, v in tied.state_dict().items()})
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    untied.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return str(out)


def test_the_chunked_loss_keeps_no_logits_for_backward():
    """The whole loss keeps the log-softmax of every position's logits (rows x tokens x vocabulary floats) for
    backward; in slices, each slice's input is kept and its logits are made again in backward, one slice at a
    time: the logits are replaced by the hidden states (the model's own pass, which ends at the last position,
    keeps nothing more)."""
    model = tiny_llama(layers=2).requires_grad_(False)
    attach_headmap(model, {1: [0, 1]}, rank=4)
    batch = batches(1)[0]
    logits_bytes, hidden_bytes = (batch["input_ids"].numel() * n * 4 for n in (model.config.vocab_size,
                                                                               model.config.hidden_size))
    whole, sliced = kept_for_backward(model, batch, False), kept_for_backward(model, batch, False, loss_chunks=4)
    assert abs((whole - sliced) - (logits_bytes - hidden_bytes)) <= 16, (whole, sliced)  # scalars aside


def test_offloading_sends_every_checkpointed_layers_input_to_host_memory(monkeypatch):
    """What save_on_cpu is handed to move, recorded: with checkpointing, each of the 4 layers' inputs (rows,
    tokens, hidden) among them, and nothing of a layer's inside (its 96-wide MLP activations)."""
    shapes = []

    class Recording(torch.autograd.graph.save_on_cpu):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pack = self.pack_hook
            self.pack_hook = lambda t: (shapes.append(tuple(t.shape)), pack(t))[1]
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Recording)
    model = tiny_llama(layers=4).requires_grad_(False)
    adapter = attach_headmap(model, {0: [1], 3: [0]}, rank=4)
    adapter.train()
    batch = batches(1)[0]
    train_adapter(model, adapter, [batch], steps=1, lr=1e-2, activation_checkpointing=True, offload_activations=True)
    rows, width = batch["input_ids"].shape
    assert shapes.count((rows, width, model.config.hidden_size)) >= 4
    assert not [s for s in shapes if model.config.intermediate_size in s]


def test_sharded_lora_equals_one_process_checkpointed_chunked_and_offloaded_or_not(tiny_folder, tmp_path):
    """--fsdp --method lora on an untied model (embeddings and LM head sharded apart): the sharded run,
    checkpointed and with the loss in 8 chunks (--fsdp's defaults), and offloaded, equals one process (none of
    them: the defaults without --fsdp), and the sharded run with none of them equals it to 1e-6. Dropout off: the ranks draw their own
    masks, so with dropout no two-process run equals one process (dropout under checkpointing is replayed exactly:
    the tests above)."""
    from tests.test_fsdp import check_adapters_and_logs, check_sharding
    args = ["finetune.py", "--model", untied_copy(tiny_folder, tmp_path / "untied"), "--dataset", "arc_easy",
            "--method", "lora", "--dropout", "0", "--train-limit", "16", "--batch-size", "5", "--max-steps", "3",
            "--warmup", "1", "--eval-every", "3", "--val-limit", "4", "--eval-limit", "4", "--lr", "1e-2"]
    launch(*args, "--out", str(tmp_path / "one"))
    launch(*args, "--out", str(tmp_path / "on"), "--fsdp", "--offload-activations", processes=2)
    launch(*args, "--out", str(tmp_path / "off"), "--fsdp", "--no-activation-checkpointing", "--loss-chunks", "1",
           processes=2)
    records = [json.loads((tmp_path / n / "training.json").read_text()) for n in ("one", "on", "off")]
    assert [r["activation_checkpointing"] for r in records] == [False, True, False]
    assert [r["loss_chunks"] for r in records] == [1, 8, 1]
    assert [r["offload_activations"] for r in records] == [False, True, False]
    assert [r["processes"] for r in records] == [1, 2, 2] and records[1]["method"] == "lora"
    check_sharding(records[1])
    logs = [[json.loads(line) for line in (tmp_path / n / "log.jsonl").read_text().splitlines()]
            for n in ("on", "off")]
    assert [e["loss"] for e in logs[0]] == pytest.approx([e["loss"] for e in logs[1]], rel=1e-6, abs=0)
    check_adapters_and_logs(tmp_path / "off", tmp_path / "on", steps=3)
    check_adapters_and_logs(tmp_path / "one", tmp_path / "on", steps=3)


def test_finetune_refuses_chunks_of_a_model_whose_logits_they_do_not_reproduce(tiny_folder, tmp_path):
    """A LLaMA whose config names a final soft-cap that LLaMA's code never applies: the chunks would cap its logits
    and the model does not, so --loss-chunks is refused in one line, exit 2, before the accuracy before training is
    scored; without chunks it trains, and the chunks, checkpointing and offloading are recorded."""
    import shutil
    from tests.conftest import run
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "final_logit_softcapping": 2.0}))
    args = ["finetune.py", "--model", str(folder), "--dataset", "arc_easy", "--method", "lora", "--train-limit", "8",
            "--batch-size", "4", "--max-steps", "1", "--val-limit", "2", "--eval-limit", "2"]
    refused = run(*args, "--loss-chunks", "4", "--out", str(tmp_path / "chunked"))
    assert refused.returncode == 2, refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("error: LlamaForCausalLM transforms its logits after its LM head") and "loss_chunks=1" in last
    assert "accuracy before" not in refused.stderr and not (tmp_path / "chunked" / "training.json").exists()
    done = run(*args, "--activation-checkpointing", "--offload-activations", "--out", str(tmp_path / "whole"))
    assert done.returncode == 0, done.stderr
    assert "--offload-activations on the CPU copies within host memory" in done.stderr
    record = json.loads((tmp_path / "whole" / "training.json").read_text())
    assert (record["loss_chunks"], record["activation_checkpointing"], record["offload_activations"]) == (1, True, True)
