"""The head selectors locate.py compares with the paper's search (headmap/selectors.py, locate --selector): each
score matrix against a brute-force computation written out here, the shared pick, and the heads.json they write."""
import json

import pytest
import torch

import headmap.attention
from bench.naive import ablate_with_hooks, o_proj_of
from data.common import Example
from data.samples import answer_samples
from data.samples import probe_pairs
from data.training import lm_batch
from headmap.selectors import (attribution_scores, circuit_from_scores, global_circuit, head_outputs,
                               independent_scores, lofit_scores, probe_accuracy, random_scores, rank_correlation)
from tests.conftest import assert_usage_error, run, tiny_llama, TinyTokenizer

EXAMPLES = [
    Example.with_choices("Pick: (A) red (B) blue\nAnswer:", ["A", "B"], 1),
    Example.with_choices("Which is cold?", ["ice cream", "fire"], 0),  # a multi-token answer
    Example.with_choices("Q: a longer question, padded against the rest?\nA:", ["x", "y"], 0),
]


@pytest.fixture(autouse=True)
def reference_attention(monkeypatch):
    """The masked attention's PyTorch reference instead of Triton's interpreter (test_kernel.py checks the kernel)."""
    monkeypatch.setattr(headmap.attention, "INTERPRET", False)


@pytest.fixture(scope="module")
def model():
    # a wider initialisation than the default, so that heads differ clearly in what they do
    return tiny_llama(layers=3, heads=4, kv_heads=2, head_dim=16, seed=5, init_range=0.2).requires_grad_(False)


def gold_nll(model, tok) -> torch.Tensor:
    """The answers' NLL summed over the examples: one stock forward per example, its logits as the model gives them."""
    total = 0.0
    for ex in EXAMPLES:
        ctx, cont = tok(ex.prompts[ex.gold]).input_ids, tok(ex.prompts[ex.gold] + ex.continuations[ex.gold]).input_ids
        logp = torch.log_softmax(model(torch.tensor([cont])).logits[0].float(), -1)
        total = total + sum(-logp[p - 1, cont[p]] for p in range(len(ctx), len(cont)))
    return total


def test_independent_scores_are_each_head_masked_alone(model):
    """One full forward per head with only that head's o_proj columns zeroed by hooks (no headmap/ code)."""
    tok = TinyTokenizer()
    got = independent_scores(model, answer_samples(tok, EXAMPLES), token_budget=40)
    layers, heads = got.shape
    want = torch.zeros(layers, heads)
    with torch.no_grad():
        for layer in range(layers):
            for h in range(heads):
                handles = ablate_with_hooks(model, {layer: [h]})
                want[layer, h] = gold_nll(model, tok)
                for handle in handles:
                    handle.remove()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("token_budget", [1, 4096])  # one sample a pass, or all in one
def test_attribution_scores_are_the_first_order_estimate_from_autograd(model, token_budget):
    """Per layer, a separate stock forward whose o_proj input is a leaf tensor: -x . dL/dx per head, by autograd."""
    tok = TinyTokenizer()
    got = attribution_scores(model, answer_samples(tok, EXAMPLES), token_budget=token_budget)
    layers, heads = got.shape
    decoder = model.model.layers
    want = torch.zeros(layers, heads)
    for layer in range(layers):
        leaves = []

        def as_leaf(module, args):
            leaves.append(args[0].detach().requires_grad_(True))
            return (leaves[-1],)
        handle = o_proj_of(decoder[layer]).register_forward_pre_hook(as_leaf)
        for ex in EXAMPLES:  # one example at a time: its own leaf
            leaves.clear()
            ctx = len(tok(ex.prompts[ex.gold]).input_ids)
            ids = tok(ex.prompts[ex.gold] + ex.continuations[ex.gold]).input_ids
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            nll = sum(-logp[p - 1, ids[p]] for p in range(ctx, len(ids)))
            (grad,) = torch.autograd.grad(nll, leaves)
            want[layer] += -(leaves[0] * grad).detach().reshape(len(ids), heads, -1).sum(dim=(0, 2))
        handle.remove()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_probe_features_are_what_each_head_writes_at_the_last_answer_token(model):
    """head_outputs against one stock forward per sequence with a hook on every o_proj input (no headmap/ code)."""
    tok = TinyTokenizer()
    gold, wrong = probe_pairs(tok, EXAMPLES, seed=0)
    assert [ids.tolist() for ids in gold] == [tok(ex.prompts[ex.gold] + ex.continuations[ex.gold]).input_ids
                                             for ex in EXAMPLES]
    got = head_outputs(model, gold + wrong, token_budget=30)
    seen = {}
    handles = [o_proj_of(layer).register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0]))
               for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for k, ids in enumerate(gold + wrong):
            model(ids[None])
            want = torch.stack([seen[layer][0, -1] for layer in range(3)]).reshape(3, 4, 16)
            torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-5)
    for handle in handles:
        handle.remove()


def test_probe_accuracy_is_sklearns_logistic_regression_cross_validated():
    """The probes of all heads, fitted at once, against scikit-learn's LogisticRegression fitted head by head on the
    same standardised features and folds: the same held-out accuracy per head."""
    from sklearn.linear_model import LogisticRegression
    g = torch.Generator().manual_seed(0)
    rows, layers, heads, width, folds = 40, 2, 3, 5, 4
    signal = torch.linspace(0, 1.5, layers * heads).reshape(layers, heads, 1)  # heads from useless to telling
    gold = torch.randn(rows, layers, heads, width, generator=g) + signal
    wrong = torch.randn(rows, layers, heads, width, generator=g) - signal
    got = probe_accuracy(gold, wrong, folds=folds)
    fold_of = [i * folds // rows for i in range(rows)] * 2
    for layer in range(layers):
        for h in range(heads):
            x = torch.cat([gold[:, layer, h], wrong[:, layer, h]]).double().numpy()
            y = [1] * rows + [0] * rows
            correct = 0
            for fold in range(folds):
                train = [i for i in range(2 * rows) if fold_of[i] != fold]
                test = [i for i in range(2 * rows) if fold_of[i] == fold]
                mean, sd = x[train].mean(0), x[train].std(0, ddof=1)
                fit = LogisticRegression(C=1.0, tol=1e-10, max_iter=10000).fit((x[train] - mean) / sd,
                                                                              [y[i] for i in train])
                correct += sum(int(p == y[i]) for p, i in zip(fit.predict((x[test] - mean) / sd), test))
            assert got[layer, h].item() == pytest.approx(correct / (2 * rows)), (layer, h)
    assert got[-1, -1] > 0.9 and got[0, 0] < 0.75  # the telling head tells, the useless one hardly


def test_lofit_scores_are_the_norms_a_hand_written_l1_penalised_loop_learns(model):
    """LoFiT's first stage against a loop written out here: a scaling vector per head applied by o_proj pre-hooks,
    AdamW (no weight decay) on the token-mean NLL of the stock model plus l1 * sum |a|, gradients clipped at 1.0, the
    learning rate decaying linearly to 0 (train_adapter's schedule with no warm-up)."""
    tok = TinyTokenizer()
    seqs = [tok(t).input_ids + [1] for t in ["Q: red? A: yes", "Q: sky? A: blue", "Q: 2+2? A: four"]]
    batch, steps, lr, l1 = lm_batch(seqs, 0), 4, 1e-2, 1e-2
    got = lofit_scores(model, [batch] * steps, steps, lr, l1)
    decoder, heads = model.model.layers, 4
    scales = [torch.zeros(heads, 16, requires_grad=True) for _ in decoder]

    def scale(layer):
        return lambda m, args: ((args[0].reshape(*args[0].shape[:-1], heads, 16) * (1 + scales[layer]))
                                .reshape(args[0].shape),)
    handles = [o_proj_of(layer).register_forward_pre_hook(scale(i)) for i, layer in enumerate(decoder)]
    optimizer = torch.optim.AdamW(scales, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (steps - step) / steps)
    labels = batch["labels"]
    for _ in range(steps):
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
        loss = nll / (labels[:, 1:] != -100).sum() + l1 * sum(a.abs().sum() for a in scales)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(scales, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    for handle in handles:
        handle.remove()
    want = torch.stack([a.detach().norm(dim=-1) for a in scales])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert got.max() > 0  # the scales moved, and the model is as it was (no hook left): the next test reads it


def test_the_shared_pick_and_the_rank_correlation_match_hand_computed_values():
    scores = torch.tensor([[0.5, 2.0, 2.0, -1.0], [3.0, 1.0, 0.0, 4.0]])
    assert circuit_from_scores(scores, 2) == {0: [1, 2], 1: [0, 3]}
    assert circuit_from_scores(scores, 1) == {0: [1], 1: [3]}  # a tie goes to the lower head
    assert rank_correlation([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert rank_correlation([1, 1, 2], [1, 2, 3]) == pytest.approx(3 ** 0.5 / 2)  # tied ranks share 0.5
    assert rank_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert global_circuit(scores, 3) == {0: [1], 1: [0, 3]}  # 4.0, 3.0, then of the tied 2.0s the lower head
    assert global_circuit(scores, 2) == {1: [0, 3]}  # a layer may hold none



def test_random_scores_are_seeded_draws():
    assert torch.equal(random_scores(3, 4, 7), random_scores(3, 4, 7))
    assert not torch.equal(random_scores(3, 4, 7), random_scores(3, 4, 8))
    assert all(len(heads) == 2 for heads in circuit_from_scores(random_scores(3, 4, 7), 2).values())


@pytest.mark.parametrize("selector", ["independent", "attribution", "probe", "lofit", "random"])
def test_locate_writes_each_selectors_circuit_in_the_same_schema(tiny_folder, tmp_path, selector):
    out = tmp_path / "heads.json"
    extra = {"attribution": ["--compare-exact"], "probe": ["--fit-rows", "12"],
             "lofit": ["--fit-rows", "12", "--lofit-steps", "2"]}.get(selector, [])
    done = run("locate.py", "--model", tiny_folder, "--dataset", "arc_easy", "--prompt", "harness", "--pool", "40",
               "--samples", "4", "--validate-limit", "8", "--random-trials", "2", "--selector", selector,
               "--no-progress", "--out", str(out), *extra)
    assert done.returncode == 0, done.stderr
    got = json.loads(out.read_text())
    assert got["selector"] == selector and got["layer_conditioned"] is False
    assert len(got["score_matrix"]) == got["layers"] == 2 and len(got["score_matrix"][0]) == got["heads"] == 4
    assert got["knowledge_circuit"] == {str(layer): {"retain_heads": heads} for layer, heads in
                                        circuit_from_scores(torch.tensor(got["score_matrix"]), 1).items()}
    assert {"circuit_masked", "random_masked_mean", "unmasked"} <= set(got["validation"]) and got["seconds"] >= 0
    assert ("loss_matrix" in got) == (selector == "independent")
    if selector in ("probe", "lofit"):  # their own pick over the whole model, of the same size
        assert got["global_circuit"] == {str(layer): heads for layer, heads in
                                         global_circuit(got["score_matrix"], 2).items()}
    assert (tmp_path / "heads.svg").exists()
    if selector == "attribution":
        comparison = got["exact_comparison"]
        assert comparison["selector"] == "independent" and len(comparison["rank_correlation_per_layer"]) == 2
        assert comparison["rank_correlation"] == pytest.approx(rank_correlation(
            sum(got["score_matrix"], []), sum(comparison["score_matrix"], [])))
        assert "rank correlation" in done.stdout


def test_a_selector_option_that_cannot_apply_is_refused_before_the_model_loads(tmp_path):
    assert_usage_error(run("locate.py", "--dataset", "arc_easy", "--compare-exact", "--model", "/no/such/model",
                           "--out", str(tmp_path / "h.json")), "--compare-exact compares an estimate")
    assert_usage_error(run("locate.py", "--dataset", "examples/facts/recall", "--selector", "probe", "--model",
                           "/no/such/model", "--out", str(tmp_path / "h.json")), "has one target per row")
    assert not (tmp_path / "h.json").exists()
    unknown = run("locate.py", "--dataset", "arc_easy", "--selector", "probes")  # argparse's own line
    assert unknown.returncode == 2 and "invalid choice: 'probes'" in unknown.stderr.splitlines()[-1]
