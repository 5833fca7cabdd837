"""locate_circuit and locate.py: exact against the brute force, resumable, and strict about bad input."""
import json

import pytest
import torch

import headmap.attention
import locate
from bench.naive import locate_brute_force
from data.samples import answer_samples
from data.common import Example
from headmap.circuit import circuit_entry, circuit_mask
from headmap.batching import plan_batches
from headmap.locate import locate_circuit, unmasked_answer_loss
from headmap.masking import mask_heads
from tests.conftest import assert_usage_error, run

EXAMPLES = [
    Example.with_choices("Pick: (A) red (B) blue\nAnswer:", ["A", "B"], 1),
    Example.with_choices("Which is cold?", ["ice cream", "fire"], 0),               # multi-token answer
    Example.with_choices("Q: a longer question, padded against the rest?\nA:", ["x", "y"], 0),
    Example(("Ann beat Bo because Ann", "Ann beat Bo because Bo"), (" was fast.", " was fast."), 1,
            ("Ann beat Bo because Ann", "Ann beat Bo because Bo")),
]


@pytest.fixture(autouse=True)
def reference_attention(monkeypatch):
    """The masked attention's PyTorch reference instead of Triton's interpreter, which is ~10x slower: what is
    tested here is locate's algorithm. test_kernel.py checks the kernel against the reference, and bench/gpu.py's
    dry run (test_gpu_bench.py) runs locate through the interpreted kernel against the brute force."""
    monkeypatch.setattr(headmap.attention, "INTERPRET", False)


@pytest.fixture(scope="module")
def brute_force(tiny):
    model, tok = tiny
    return locate_brute_force(model, tok, EXAMPLES, 2)


@pytest.mark.parametrize("token_budget", [1, 40, 100, 4096])  # 1: a row per batch; 40, 100: cut to other widths
def test_fast_locate_equals_brute_force(tiny, brute_force, token_budget):
    model, tok = tiny
    state = {}
    circuit, loss_matrix = locate_circuit(model, answer_samples(tok, EXAMPLES), 2, token_budget, state=state)
    expected_circuit, expected_losses, expected_below = brute_force
    assert circuit == expected_circuit
    torch.testing.assert_close(loss_matrix, torch.tensor(expected_losses), atol=1e-3, rtol=1e-5)
    assert loss_matrix.tolist() == state["loss_matrix"]
    torch.testing.assert_close(torch.tensor(state["circuit_below_loss"]), torch.tensor(expected_below),
                               atol=1e-3, rtol=1e-5)
    # below layer 0 nothing is masked: the "no head" row of layer 0 is the unmasked model's loss
    assert state["circuit_below_loss"][0] == pytest.approx(unmasked_answer_loss(model, answer_samples(tok, EXAMPLES)),
                                                           rel=1e-5)


def test_locate_circuit_equals_a_brute_force_loop_over_mask_heads(tiny):
    """Algorithm 1 written the plain way with the library's own mask_heads: per layer and head, one full forward of
    every sample with the circuit so far and the candidate masked, the answers' NLL summed."""
    model, tok = tiny
    samples = answer_samples(tok, EXAMPLES)
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads

    def loss_with(mask):
        total = 0.0
        with torch.inference_mode(), mask_heads(model, mask):
            for ids, start in samples:
                logp = torch.log_softmax(model(ids[None]).logits[0].float(), -1)
                total -= logp[torch.arange(start - 1, len(ids) - 1), ids[start:]].sum().item()
        return total

    circuit, matrix = {}, []
    for layer in range(layers):
        row = []
        for head in range(heads):
            mask = circuit_mask({**circuit, layer: [head]}, layers, heads)
            row.append(loss_with(mask))
        matrix.append(row)
        circuit[layer] = sorted(sorted(range(heads), key=lambda h: (-row[h], h))[:2])
    got, loss_matrix = locate_circuit(model, samples, 2, 64)
    assert got == circuit
    torch.testing.assert_close(loss_matrix, torch.tensor(matrix), atol=1e-3, rtol=1e-5)


def test_locate_circuit_refuses_bad_samples_and_counts(tiny):
    model, tok = tiny
    ids = torch.tensor([2, 5, 6])
    with pytest.raises(ValueError, match="answer_start 3 leaves no prompt or no answer in a sample of 3 tokens"):
        locate_circuit(model, [(ids, 3)], 1)
    with pytest.raises(ValueError, match="heads_per_layer must be in 1..3 for a model with 4 heads, got 4"):
        locate_circuit(model, [(ids, 1)], 4)


def test_batches_keep_to_the_token_budget_and_cover_every_row_once():
    lengths = [5, 12, 7, 12, 3]
    for budget, world in [(1, 1), (30, 1), (50, 2), (1000, 3)]:
        plan = plan_batches(lengths, 3, budget, world)
        assert len(plan) % world == 0
        rows = sorted((h, i) for c, s, _ in plan for h, i in zip(c, s))
        assert rows == sorted((h, i) for h in range(3) for i in range(5))
        for c, s, width in plan:
            if s:
                assert width == max(lengths[i] for i in s)  # cut to its own longest row
                assert len(s) * width <= budget or len(s) == 1
    assert [len(c) for c, _, _ in plan_batches(lengths, 3, 36, 1)] == [3, 3, 5, 4]  # 12 12 | 12 12 | ...


def test_unmasked_loss_matches_full_forward(tiny):
    model, tok = tiny
    from bench.naive import choice_scores_one_by_one
    expected = -sum(s[ex.gold] for s, ex in zip(choice_scores_one_by_one(model, tok, EXAMPLES), EXAMPLES))
    assert unmasked_answer_loss(model, answer_samples(tok, EXAMPLES)) == pytest.approx(expected, rel=1e-5)


def test_resume_gives_the_uninterrupted_result(tiny):
    model, tok = tiny
    samples = answer_samples(tok, EXAMPLES)
    full = {}
    locate_circuit(model, samples, 1, 64, state=full)

    class Interrupt(Exception):
        pass

    saved = {}

    def stop_after_two(state):
        if len(state["loss_matrix"]) == 2:
            saved.update(json.loads(json.dumps(state)))  # what the progress file holds
            raise Interrupt

    with pytest.raises(Interrupt):
        locate_circuit(model, samples, 1, 64, stop_after_two)
    resumed, _ = locate_circuit(model, samples, 1, 64, state=saved)
    assert resumed == {int(k): v for k, v in full["circuit"].items()}
    assert saved["loss_matrix"] == full["loss_matrix"] and saved["circuit_below_loss"] == full["circuit_below_loss"]


def test_the_library_finds_what_locate_py_finds_on_the_same_samples(tiny_run, tmp_path):
    """locate.py is a thin program over locate_circuit: its heads.json's circuit and loss matrix are what the library
    gives on the samples it chose, tokenised by the model's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data.tasks import open_task
    folder = str(tiny_run / "model")
    got = locate.main(["--dataset", "arc_easy", "--prompt", "harness", "--model", folder, "--pool", "30", "--samples",
                       "4", "--heads-per-layer", "1", "--no-validate", "--no-progress", "--out",
                       str(tmp_path / "heads.json")])
    examples = open_task("arc_easy", "harness").examples("train", 30)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    circuit, loss_matrix = locate_circuit(model, answer_samples(tokenizer, [examples[i] for i in got["sample_indices"]]), 1)
    assert got["knowledge_circuit"] == circuit_entry(circuit)["knowledge_circuit"]
    assert got["loss_matrix"] == loss_matrix.tolist()


def test_locate_samples_from_an_earlier_run_are_the_samples_scoring_the_pool_chooses(tiny_run, tmp_path, monkeypatch):
    """--samples-from reuses an earlier run's D (to vary n) or its lowest-loss part (to vary D) without scoring the
    pool: the same samples, and so the same circuit, as a fresh run that scores it."""
    base = ["--dataset", "arc_easy", "--prompt", "harness", "--model", str(tiny_run / "model"), "--pool", "40",
            "--no-validate", "--no-progress"]
    fresh = {d: locate.main(base + ["--samples", str(d), "--heads-per-layer", "1", "--out", str(tmp_path / f"{d}.json")])
             for d in (6, 3)}
    assert len(fresh[6]["sample_indices"]) == 6 and len(fresh[6]["sample_losses"]) == 6
    assert set(fresh[3]["sample_indices"]) < set(fresh[6]["sample_indices"])  # a subset, so the test can tell

    def never(*args, **kwargs):
        raise AssertionError("the pool was scored again")

    monkeypatch.setattr("data.samples.select_samples", never)
    for d in (3, 6):
        got = locate.main(base + ["--samples", str(d), "--heads-per-layer", "1", "--samples-from",
                                  str(tmp_path / "6.json"), "--out", str(tmp_path / f"from{d}.json")])
        for key in ("sample_indices", "sample_losses", "knowledge_circuit", "loss_matrix"):
            assert got[key] == fresh[d][key], (d, key)
        assert got["samples_from"] == str(tmp_path / "6.json")


def test_locate_samples_from_a_run_of_other_rows_is_refused_before_the_model_loads(tiny_run, tmp_path):
    earlier = tmp_path / "earlier.json"
    recorded = {"model": "elsewhere", "dataset": "arc_easy", "split": "train", "pool": 40, "prompt": "harness",
                "data": {"source": "bundled", "caveat": None}, "sample_indices": [1, 5, 7]}
    base = ["locate.py", "--dataset", "arc_easy", "--prompt", "harness", "--model", "elsewhere", "--pool", "40",
            "--samples", "3", "--samples-from", str(earlier), "--no-validate"]
    for change, args, message in [
            ({"pool": 30}, [], "its samples were chosen with pool 30, not 40; pass a run of the same model, task"),
            ({"data": {"source": "x", "caveat": None}}, [], "its samples were chosen with data {'source': 'x'"),
            ({}, ["--samples", "4"], "holds 3 samples; pass --samples 3 or fewer"),
            ({}, ["--samples", "2"], "records no sample losses, so its 2 lowest-loss samples are unknown"),
            ({"sample_indices": None}, [], "records no samples; pass a heads.json written by locate.py")]:
        earlier.write_text(json.dumps({**recorded, **change}))
        assert_usage_error(run(*base, *args), message)  # the model 'elsewhere' does not exist: refused before it loads


def test_the_locate_benchmark_runs_and_agrees_with_the_naive_loop(tiny_run):
    result = run("bench/locate_vs_naive_loop.py", "--model", str(tiny_run / "model"), "--prompt", "harness", "--pool", "20",
                 "--samples", "3")
    assert result.returncode == 0, result.stderr
    assert "circuits identical: True" in result.stdout, result.stdout
