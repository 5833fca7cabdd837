"""Head masking wired into a Hugging Face model, checked against the stock model and a plain forward pre-hook."""
import json

import pytest
import torch

from cli.earlier_runs import read_circuit_file
from headmap.errors import UnreadableFile
from headmap.circuit import check_circuit, circuit_entry, circuit_mask, random_circuit_like, read_circuit
from headmap.masking import mask_heads
from tests.conftest import tiny_llama
from bench.naive import ablate_with_hooks

LAYERS, HEADS, HEAD_DIM = 3, 4, 16


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=LAYERS, heads=HEADS, kv_heads=2, head_dim=HEAD_DIM, seed=1)


@torch.no_grad()
def test_empty_mask_gives_stock_logits(model):
    x = torch.randint(0, 512, (3, 21))
    stock = model(x).logits
    with mask_heads(model, torch.zeros(LAYERS, HEADS, dtype=torch.bool)):
        masked = model(x).logits
    torch.testing.assert_close(masked, stock, atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation == "sdpa" and not hasattr(model.model.layers[0].self_attn, "head_mask")


@torch.no_grad()
@pytest.mark.parametrize("per_row", [False, True])
def test_masking_equals_zeroing_o_proj_input_columns(model, per_row):
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 512, (3, 19), generator=g)
    mask = torch.rand((LAYERS, 3, HEADS) if per_row else (LAYERS, HEADS), generator=g) < 0.4
    hooks = ablate_with_hooks(model, mask)
    try:
        expected = model(x).logits
    finally:
        for h in hooks:
            h.remove()
    with mask_heads(model, mask):
        got = model(x).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_rows_with_different_masks_equal_rows_run_alone_even_padded(model):
    g = torch.Generator().manual_seed(6)
    lengths = [17, 9, 13]
    x = torch.randint(0, 512, (3, 17), generator=g)
    mask = torch.rand(LAYERS, 3, HEADS, generator=g) < 0.5
    with mask_heads(model, mask):
        batched = model(x).logits
    for row, n in enumerate(lengths):  # right padding: the row's first n positions must not depend on the rest
        with mask_heads(model, mask[:, row]):
            alone = model(x[row:row + 1, :n]).logits[0]
        torch.testing.assert_close(batched[row, :n], alone, atol=1e-5, rtol=1e-5)


def test_bad_mask_shape_is_refused(model):
    with pytest.raises(ValueError, match=r"shape \(3, 4\)"):
        with mask_heads(model, torch.zeros(2, 4, dtype=torch.bool)):
            pass


def test_circuit_files_ours_and_official(tmp_path):
    circuit = {0: [1, 3], 2: [0]}
    ours = tmp_path / "heads.json"
    ours.write_text(json.dumps({**circuit_entry(circuit), "model": "x"}))
    assert json.loads(ours.read_text())["knowledge_circuit"] == {"0": {"retain_heads": [1, 3]}, "2": {"retain_heads": [0]}}
    official = tmp_path / "circuit.pt"
    torch.save({"knowledge_circuit": {k: {"retain_heads": v} for k, v in circuit.items()}}, official)
    assert read_circuit(str(ours)) == circuit == read_circuit(str(official))
    mask = circuit_mask(circuit, LAYERS, HEADS)
    assert mask.sum() == 3 and mask[0, 1] and mask[0, 3] and mask[2, 0]
    rand = random_circuit_like(circuit, HEADS, torch.Generator().manual_seed(0))
    assert {k: len(v) for k, v in rand.items()} == {0: 2, 2: 1}


def test_circuit_errors(tmp_path):
    with pytest.raises(FileNotFoundError):  # the library raises plainly
        read_circuit(str(tmp_path / "missing.json"))
    with pytest.raises(UnreadableFile, match="circuit file .*missing.json does not exist; pass a heads.json"):
        read_circuit_file(str(tmp_path / "missing.json"))  # the scripts' reader: one line
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UnreadableFile, match="cannot be read \\(JSONDecodeError"):
        read_circuit_file(str(bad))
    notes = tmp_path / "notes.md"
    notes.write_text("# my circuit\n")
    with pytest.raises(UnreadableFile, match="notes.md cannot be read \\(ValueError: it is neither JSON nor a torch file"):
        read_circuit_file(str(notes))
    official = tmp_path / "circuit"  # a torch file needs no extension
    torch.save({"knowledge_circuit": {1: {"retain_heads": [2]}}}, official)
    assert read_circuit(str(official)) == {1: [2]}
    bad.write_text('{"layers": []}')
    with pytest.raises(ValueError, match="not a knowledge circuit"):
        read_circuit(str(bad))
    bad.write_text('{"knowledge_circuit": {"0": {"retain_heads": []}}}')
    with pytest.raises(UnreadableFile, match="names no heads"):
        read_circuit_file(str(bad))
    with pytest.raises(ValueError, match=r"head\(s\) \[4\] out of range for 4 heads"):
        check_circuit({0: [1, 4]}, LAYERS, HEADS)
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        check_circuit({3: [0]}, LAYERS, HEADS)


def test_scoring_with_heads_masked_equals_one_hooked_forward_per_choice(model):
    """The scoring path runs each prompt once and its choices against the key/value cache, through the masked
    kernel (queries after cached keys); the reference runs the stock model once per choice, heads zeroed by hooks."""
    from data.scoring import score_examples
    from bench.naive import choice_scores_one_by_one
    from tests.conftest import TinyTokenizer
    from tests.test_scoring import TINY_EXAMPLES, flat
    mask = torch.zeros(LAYERS, HEADS, dtype=torch.bool)
    mask[0, 1] = mask[1, 0] = mask[1, 3] = mask[2, 2] = True
    with mask_heads(model, mask):
        fast = score_examples(model, TinyTokenizer(), TINY_EXAMPLES, batch_size=2, progress=False, token_budget=8)
    handles = ablate_with_hooks(model, mask)
    try:
        slow = choice_scores_one_by_one(model, TinyTokenizer(), TINY_EXAMPLES)
    finally:
        for handle in handles:
            handle.remove()
    assert flat(fast) == pytest.approx(flat(slow), abs=1e-4)
    assert flat(fast) != pytest.approx(flat(choice_scores_one_by_one(model, TinyTokenizer(), TINY_EXAMPLES)), abs=1e-3)
