"""Adapters (HeadMap, LoRA, DoRA) and the training loop, against the base model and explicit formulas."""
import argparse
import json
import math

import pytest
import torch

from cli.run_folder import read_run_state, train_in_folder
from data.training import lm_batch
from headmap.adapters import attach_headmap, attach_lora
from headmap.saving import load_adapter, save_adapter
from headmap.batching import length_groups, pass_overhead_tokens
from headmap.train import batch_loss, summed_nll, train_adapter
from tests.conftest import TinyTokenizer, tiny_llama

CIRCUIT = {0: [1, 3], 2: [0, 2]}
METHODS = ["headmap-mha", "headmap-hs", "lora", "dora"]


def attach(model, method):
    if method.startswith("headmap"):
        return attach_headmap(model, CIRCUIT, rank=8, variant=method.split("-")[1])
    return attach_lora(model, rank=8, alpha=16, dropout=0.0, dora=method == "dora")


@pytest.fixture
def model():
    return tiny_llama(layers=3, heads=4, kv_heads=2, head_dim=16, seed=2).requires_grad_(False)


def train_args(tmp_path, **kw):
    base = dict(lr=1e-2, batch_size=4, token_budget=4096, epochs=50, warmup=2, max_steps=None, eval_every=5,
                checkpoint_every=1000, seed=0, out=str(tmp_path), resume=False, no_progress=True,
                activation_checkpointing=False, loss_chunks=1, offload_activations=False)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("method", METHODS)
def test_adapter_starts_as_the_base_model(model, method):
    x = torch.randint(0, 512, (2, 13))
    with torch.no_grad():
        base = model(x).logits
        adapter = attach(model, method)
        assert torch.equal(model(x).logits, base)
        adapter.remove()
        assert torch.equal(model(x).logits, base)


@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_gets_gradients_and_base_is_untouched(model, method):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = attach(model, method)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    for _ in range(2):  # the second step moves everything: after the first, the zero matrices are non-zero
        model(torch.randint(0, 512, (2, 9)), labels=torch.randint(0, 512, (2, 9))).loss.backward()
        assert all(p.grad is None for p in model.parameters())
        assert all(p.grad is not None for p in adapter.parameters())
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_trainable_parameter_counts_match_formulas(model):
    n, d, r, hidden, inter = 2, 16, 8, 64, 96
    # per layer: q (64->64), k and v (64->32), up (64->96), down (96->64)
    lora = 3 * r * ((64 + 64) + 2 * (64 + 32) + (64 + inter) + (inter + 64))
    for method, count in [("headmap-mha", 2 * (n * d * r + r + r * hidden + hidden)), ("lora", lora),
                          ("dora", lora + 3 * (64 + 32 + 32 + inter + 64))]:
        adapter = attach(model, method)
        assert sum(p.numel() for p in adapter.parameters()) == count, method
        adapter.remove()  # one adapter on a model at a time


def test_headmap_equals_its_formula(model):
    adapter = attach(model, "headmap-mha")
    hm = adapter.sites["0"]
    torch.nn.init.normal_(hm.up.weight)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, 64)
    x_r = torch.cat([x[..., 16:32], x[..., 48:64]], -1)  # heads 1 and 3
    expected = attn.o_proj.weight @ x[..., None] + (hm.up.weight @ (hm.down.weight @ x_r[..., None] + hm.down.bias[:, None])
                                                     + hm.up.bias[:, None])
    torch.testing.assert_close(attn.o_proj(x), expected[..., 0], atol=1e-5, rtol=1e-5)


def test_dora_trains_after_scoring_in_inference_mode(model):
    adapter = attach(model, "dora")
    x = torch.randint(0, 512, (2, 7))
    with torch.inference_mode():  # as when finetune.py scores the base model before training
        model(x)
    adapter.train()
    model(x).logits.sum().backward()
    assert all(p.grad is not None for p in adapter.parameters())


def test_dora_equals_its_formula(model):
    adapter = attach(model, "dora")
    lin = model.model.layers[1].mlp.up_proj
    site = adapter.sites["model/layers/1/mlp/up_proj"]
    torch.nn.init.normal_(site.B.weight)
    torch.nn.init.uniform_(site.magnitude, 0.5, 2.0)
    w = lin.weight + site.scaling * site.B.weight @ site.A.weight
    w = site.magnitude[:, None] * w / w.norm(dim=1, keepdim=True)
    x = torch.randn(3, 64)
    torch.testing.assert_close(lin(x), x @ w.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_tiny_model_overfits_a_handful_of_examples(method, tmp_path):
    # a wider initialisation than the default 0.02, or the random LM head could not express a confident answer
    model = tiny_llama(layers=3, heads=4, kv_heads=2, head_dim=16, seed=2, init_range=0.2).requires_grad_(False)
    tok = TinyTokenizer()
    texts = ["Q: red? A: yes", "Q: sky? A: blue", "Q: 2+2? A: four", "Q: ice? A: cold"]
    seqs = [tok(t).input_ids + [1] for t in texts]
    adapter = attach(model, method)
    first = batch_loss(model, lm_batch(seqs, 0))
    best, steps = train_in_folder(model, adapter, seqs, seqs, 0, train_args(tmp_path, lr=3e-2, epochs=100, max_steps=60))
    assert steps == 60 and best["loss"] < first / 2


def test_save_load_round_trip(model, tmp_path):
    x = torch.randint(0, 512, (2, 11))
    adapter = attach(model, "headmap-hs")
    for p in adapter.parameters():
        torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        tuned = model(x).logits
    save_adapter(adapter, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in tmp_path.iterdir())  # readable like any output
    adapter.remove()
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, tuned)
        load_adapter(model, str(tmp_path))
        assert torch.equal(model(x).logits, tuned)


def train_tiny_lora(out, dropout, stop_at=None, **kw):
    """train_in_folder (finetune.py's loop) for LoRA on a tiny LLaMA and five short texts, raising KeyboardInterrupt after step `stop_at`;
    returns the adapter's parameters. `kw` are train_args' (resume, batch size, checkpoint interval, ...)."""
    tok = TinyTokenizer()
    seqs = [tok(t).input_ids + [1] for t in ["a b c", "d e f g", "h i", "j k l m n", "o p q"]]
    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16, seed=3).requires_grad_(False)
    torch.manual_seed(0)
    adapter = attach_lora(model, rank=4, alpha=8, dropout=dropout)
    adapter.train()

    def on_step(step):
        if step == stop_at:
            raise KeyboardInterrupt
    run = train_args(out, epochs=3, eval_every=4, **kw)
    ckpt = read_run_state(str(out), run.resume, {})[1]  # what finetune.py reads once, before the model loads
    train_in_folder(model, adapter, seqs, seqs[:2], 0, run, on_step, ckpt=ckpt)
    return [p.clone() for p in adapter.parameters()]


def test_resume_gives_the_same_adapter(tmp_path):
    def run(out, stop_at=None, resume=False):  # dropout: the RNG state must resume too
        return train_tiny_lora(out, 0.1, stop_at, batch_size=2, checkpoint_every=3, resume=resume)

    full = run(tmp_path / "full")
    for stop_at in (5, 7):  # the checkpoints of step 4 (a validation) and step 6 (--checkpoint-every 3) survive
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "cut", stop_at=stop_at, resume=stop_at > 5)
    resumed = run(tmp_path / "cut", resume=True)
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))  # each resume runs again, and logs once, the steps after its checkpoint


def test_validation_loss_is_measured_without_dropout(tmp_path):
    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16, seed=4).requires_grad_(False)
    seqs = [TinyTokenizer()(t).input_ids + [1] for t in ["a b c", "d e f"]]
    adapter = attach_lora(model, rank=4, alpha=8, dropout=0.5)
    for p in adapter.parameters():
        torch.nn.init.normal_(p, std=0.5)  # a non-zero B, so dropout would change the output
    adapter.train()
    best, _ = train_in_folder(model, adapter, seqs, seqs, 0, train_args(tmp_path, lr=0.0, epochs=1, eval_every=1))
    adapter.eval()
    assert best["loss"] == batch_loss(model, lm_batch(seqs, 0))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_length_groups_are_the_cheapest_split_within_the_budget(device):
    import itertools
    lengths = [37, 5, 22, 23, 9, 40, 8, 21, 39, 6]
    budget = 90
    overhead = pass_overhead_tokens(device)
    groups = [[lengths[i] for i in g] for g in length_groups(lengths, budget, overhead)]
    assert sorted(n for g in groups for n in g) == sorted(lengths)
    assert all(len(g) * max(g) <= budget for g in groups)

    def cost(split):
        return sum(len(g) * max(g) + overhead for g in split)
    ordered = sorted(lengths, reverse=True)
    best = math.inf
    for cuts in itertools.product([0, 1], repeat=len(ordered) - 1):  # brute force: every split of the sorted rows
        split, start = [], 0
        for i, cut in enumerate(cuts + (1,)):
            if cut:
                split.append(ordered[start:i + 1])
                start = i + 1
        if all(len(g) * max(g) <= budget for g in split):
            best = min(best, cost(split))
    assert cost(groups) == best
    assert length_groups([50], 10, overhead) == [[0]]  # a row over the budget still runs, alone


def test_a_gpu_runs_a_batch_that_fits_the_budget_as_one_pass():
    """On a GPU a pass is launch-bound, so a batch is split only for memory; on the CPU, to skip padded tokens."""
    lengths = [120, 118, 90, 64, 40, 33, 20, 12] * 2  # a batch of 16 rows: 16 x 120 = 1920 padded tokens
    assert length_groups(lengths, 4096, pass_overhead_tokens("cuda")) == [sorted(range(16), key=lambda i: -lengths[i])]
    assert len(length_groups(lengths, 4096, pass_overhead_tokens("cpu"))) > 1
    assert len(length_groups(lengths, 960, pass_overhead_tokens("cuda"))) == 2  # the budget still bounds memory


@pytest.mark.parametrize("method", ["headmap-mha", "lora"])
def test_micro_batched_gradient_equals_one_padded_pass(model, method):
    tok = TinyTokenizer()
    texts = ["a b c d e f g h i j k", "l m", "n o p q r s", "t u v w x y z a b c d e f g", "h i j", "k l m n o"]
    seqs = [tok(t).input_ids + [1] for t in texts]
    adapter = attach(model, method)
    for p in adapter.parameters():
        torch.nn.init.normal_(p, std=0.1)

    def grads():
        out = [p.grad.clone() for p in adapter.parameters()]
        adapter.zero_grad()
        return out
    whole = lm_batch(seqs, 0)  # one pass, right-padded: the stock model's own loss is the token mean
    model(**whole).loss.backward()
    padded = grads()
    nll, n = summed_nll(model, whole["input_ids"], whole["attention_mask"], whole["labels"]), sum(len(s) - 1 for s in seqs)
    assert len(length_groups([len(s) for s in seqs], 20, pass_overhead_tokens("cpu"))) > 2
    loss = batch_loss(model, whole, token_budget=20, backward=True)
    assert loss == pytest.approx(nll.item() / n, rel=1e-6)
    for a, b in zip(grads(), padded):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["headmap-mha", "dora"])
def test_train_adapter_equals_a_plain_adamw_loop_on_the_stock_loss(method):
    """The library's loop against the loop a user writes: one padded pass per batch through the stock model's own
    loss (labels), torch's AdamW, LambdaLR warm-up and decay, clipping; the same losses and the same weights."""
    tok = TinyTokenizer()
    texts = ["a b c d e f g h", "i j", "k l m n o", "p q r s t u v w x y", "z a b", "c d e f"]
    batches = [lm_batch([tok(t).input_ids + [1] for t in texts[i:i + 3]], 0) for i in (0, 3, 0, 3)]

    def fresh():
        m = tiny_llama(layers=3, heads=4, kv_heads=2, head_dim=16, seed=2).requires_grad_(False)
        torch.manual_seed(0)
        return m, attach(m, method)

    model, adapter = fresh()
    losses, _ = train_adapter(model, adapter, batches, steps=4, lr=1e-2, warmup=2, token_budget=16)
    ours = [p.detach().clone() for p in adapter.parameters()]

    model, adapter = fresh()
    params = list(adapter.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    factor = [0.0, 0.5, 1.0, 0.5]  # warm-up over 2 steps, then linear decay to 0 at step 4
    reference = []
    for step, batch in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = 1e-2 * factor[step]
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        reference.append(loss.item())
    assert losses == pytest.approx(reference, rel=1e-5)
    for a, b in zip(ours, params):
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-6)


def test_train_adapter_keeps_the_best_and_resumes_from_a_checkpoint():
    import io
    tok = TinyTokenizer()
    seqs = [tok(t).input_ids + [1] for t in ["a b c", "d e f g", "h i", "j k l m n", "o p q"]]
    batches = [lm_batch(seqs[i:i + 2], 0) for i in (0, 2, 3, 1, 0, 2)]
    held_out = lm_batch(seqs[:2], 0)

    def run(resume=None):
        model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16, seed=3).requires_grad_(False)
        torch.manual_seed(0)
        adapter = attach_lora(model, rank=4, alpha=8, dropout=0.1)
        adapter.train()
        records, saved = [], io.BytesIO()

        def on_step(record, checkpoint):
            records.append(record)
            if record["step"] == 3:
                torch.save(checkpoint(), saved)  # as a user saves it
        losses, _ = train_adapter(model, adapter, batches, 6, 3e-1, 1, eval_batch=held_out, eval_every=2,
                               resume=resume, on_step=on_step)
        adapter.eval()
        return losses, records, saved, batch_loss(model, held_out)

    losses, records, saved, final = run()
    vals = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert sorted(vals) == [2, 4, 6] and len(set(vals.values())) == 3
    best = min(vals, key=vals.get)
    assert [r["step"] for r in records if r.get("best")][-1] == best
    assert final == pytest.approx(vals[best], rel=1e-6)  # the adapter ends with the best weights
    saved.seek(0)
    resumed, later, _, final_resumed = run(resume=torch.load(saved, weights_only=True))
    assert [r["step"] for r in later] == [4, 5, 6] and resumed == losses[3:]  # dropout's RNG resumed too
    assert final_resumed == final


def test_batch_loss_refuses_left_padding():
    model = tiny_llama(layers=1, heads=4, kv_heads=2, head_dim=16)
    batch = lm_batch([[2, 5, 6], [2, 7]], 0)
    left = {k: v.flip(1) for k, v in batch.items()}
    with pytest.raises(ValueError, match="batch_loss needs right padding"):
        batch_loss(model, left)
