"""Every causal-LM type of the installed transformers, as a tiny random model (tests/architectures.py) with a
short sliding window, soft-caps and logit scaling forced on where the type has them. Five columns, each exact
against an independent reference or refused with an error naming the architecture and the feature:
evaluate (score_examples vs one stock forward per choice), mask (per-row masks on a right-padded batch vs o_proj
hooks, and masked scores), locate (vs the brute force), headmap and lora (HeadMap MHA/HS, LoRA and DoRA start as
the base model). EXPECTED says which, type by type; a type missing from it fails, so a transformers upgrade that
adds a decoder shows up here. docs/architectures.md's support table is this table.

The masked forwards here run the kernel's PyTorch reference (test_kernel.py checks the Triton kernel against it
for every feature used: windows, soft-caps, masks), so that ~100 models fit the CI budget.
"""
import pytest
import torch

import headmap.attention
from data.samples import answer_samples
from data.scoring import score_examples
from data.common import Example
from headmap.adapters import attach_headmap, attach_lora
from headmap.locate import locate_circuit
from headmap.masking import UnsupportedModel, mask_heads
from headmap.masking import probe
from headmap.train import summed_nll
from tests.architectures import causal_lm_types, tiny_model
from tests.conftest import TinyTokenizer
from bench.naive import ablate_with_hooks, choice_scores_one_by_one, locate_brute_force

E = "exact"
COLUMNS = ("evaluate", "mask", "locate", "headmap", "lora")  # docs/architectures.md's table, one column each
ALL = (E,) * len(COLUMNS)
# per type: every column exact (ALL), or per column "exact" or a piece of the refusal's message; or the type's
# tiny config cannot be built (nothing of ours to check). Regenerate by running
# status() on every type when transformers changes, and read each change before accepting it.
# pieces of the refusals' messages
SINKS, INDICES, DIFFERENTIAL = "attention sinks", "'indices'", "differential or custom attention"
NORM_BEFORE_O, LINEAR = "does not read the attention output", "linear or recurrent attention"
FLOAT_MASK, LAYER_STATE, HS_SHAPE = "float32 attention mask", "hand more than the hidden state", "the HS variant cannot add"
NO_O_PROJ, NO_LORA_TARGET = "head masking needs", "has none of the LoRA targets"
RECURRENT_CACHE, NO_CACHE = "caches a recurrent state", "no key/value cache"
NO_LAYER_LIST, POSITION_BIAS = "no list of decoder layers", "'position_bias'"
WINDOW_CACHE, NO_CONTINUATION = "does not apply the window its cache keeps", "cannot continue its own key/value cache"
NOT_LINEAR, STACKED_STATE = "not a linear layer", "pass hidden states of shape"
STOCK_FAILS = "the stock model's own forward fails"
EXPECTED = {
    "afmoe": (E, NORM_BEFORE_O, NORM_BEFORE_O, E, E),
    "apertus": ALL,
    "apertus1p5_text": ALL,
    "arcee": ALL,
    "aria_text": ALL,
    "axk1": ALL,
    "axk2": (E, INDICES, INDICES, E, E),
    "bailing_hybrid": (RECURRENT_CACHE, LINEAR, LINEAR, E, E),
    "bamba": (RECURRENT_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "bart": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "beam": (E, NORM_BEFORE_O, NORM_BEFORE_O, E, E),
    "bert": (NO_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "bert-generation": (NO_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "big_bird": (NO_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "bigbird_pegasus": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "biogpt": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "bitnet": (E, NORM_BEFORE_O, NORM_BEFORE_O, E, E),
    "blenderbot": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "blenderbot-small": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "bloom": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "blt": (STOCK_FAILS,) * len(COLUMNS),  # transformers' own forward: BltConfig has no num_hidden_layers
    "camembert": (NO_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "codegen": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "cohere": ALL,
    "cohere2": ALL,
    "cohere2_moe": ALL,
    "cohere_compass_text": ALL,
    "cpmant": (NO_CONTINUATION, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "ctrl": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "cwm": ALL,
    "data2vec-text": (NO_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "dbrx": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "deepseek_v2": ALL,
    "deepseek_v3": ALL,
    "deepseek_v32": (E, INDICES, INDICES, E, E),
    "deepseek_v4": (RECURRENT_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "diffllama": (E, DIFFERENTIAL, DIFFERENTIAL, E, E),
    "doge": (E, FLOAT_MASK, FLOAT_MASK, E, E),
    "dory": (E, NORM_BEFORE_O, NORM_BEFORE_O, E, E),
    "dots1": ALL,
    "dots3_note": (E, INDICES, INDICES, E, E),
    "dots3_note_text": (E, INDICES, INDICES, E, E),
    "electra": (NO_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "emu3": ALL,
    "ergo": ALL,
    "ernie": (NO_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "ernie4_5": ALL,
    "ernie4_5_moe": ALL,
    "exaone": ALL,
    "exaone4": ALL,
    "exaone_moe": ALL,
    "falcon": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "falcon_h1": (RECURRENT_CACHE, RECURRENT_CACHE, E, E, E),
    "falcon_mamba": (RECURRENT_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "flex_olmo": ALL,
    "flint": (E, SINKS, SINKS, E, E),
    "fuyu": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "gemma": ALL,
    "gemma2": ALL,
    "gemma3": ALL,
    "gemma3_text": ALL,
    "gemma3n": "cannot build",  # its vision tower needs timm, not installed here; its text model is gemma3n_text
    "gemma3n_text": (E, E, STACKED_STATE, HS_SHAPE, E),
    "gemma4": ALL,
    # a drafter: transformers' default config fails its own check, and its forward needs the backbone's keys/values
    "gemma4_assistant": "cannot build",
    "gemma4_text": ALL,
    "gemma4_unified": ALL,
    "gemma4_unified_assistant": "cannot build",  # a drafter: its forward needs the backbone's keys and values
    "gemma4_unified_text": ALL,
    "git": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "glm": ALL,
    "glm4": ALL,
    "glm4_moe": ALL,
    "glm4_moe_lite": ALL,
    "glm_moe_dsa": (E, INDICES, INDICES, E, E),
    "got_ocr2": ALL,
    "gpt-sw3": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "gpt2": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "gpt_bigcode": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "gpt_neo": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "gpt_neox": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "gpt_neox_japanese": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "gpt_oss": (E, SINKS, SINKS, E, E),
    "gptj": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "granite": ALL,
    "granite_swa": (E, SINKS, SINKS, E, E),
    "granitemoe": ALL,
    "granitemoe_swa": (E, SINKS, SINKS, E, E),
    "granitemoehybrid": (RECURRENT_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "granitemoeshared": ALL,
    "helium": ALL,
    "hrm_text": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "hunyuan_v1_dense": ALL,
    "hunyuan_v1_moe": ALL,
    "hy_v3": ALL,
    "hy_v4": (E, INDICES, INDICES, HS_SHAPE, E),
    "hyperclovax": ALL,
    "inkling2_loop_text": (RECURRENT_CACHE, POSITION_BIAS, POSITION_BIAS, NOT_LINEAR, NO_LORA_TARGET),
    "inkling2_text": (RECURRENT_CACHE, POSITION_BIAS, POSITION_BIAS, NOT_LINEAR, NO_LORA_TARGET),
    "inkling_text": (RECURRENT_CACHE, POSITION_BIAS, POSITION_BIAS, E, E),
    "internlm3": ALL,
    "iquestcoder": ALL,
    "jais2": ALL,
    "jamba": (RECURRENT_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "jetmoe": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "kimi_linear": (RECURRENT_CACHE, LINEAR, LINEAR, E, E),
    "kolibri1": ALL,
    "kolibri1_1": (E, E, LAYER_STATE, E, E),
    "laguna": (E, NORM_BEFORE_O, NORM_BEFORE_O, E, E),
    "lara_mini": (RECURRENT_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "lfm2": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "lfm2_moe": (RECURRENT_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "lfm3": (RECURRENT_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "llama": ALL,
    "llama4": ALL,
    "llama4_text": ALL,
    "longcat_flash": (E, NO_LAYER_LIST, NO_LAYER_LIST, NO_LAYER_LIST, E),
    "mamba": (RECURRENT_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "mamba2": (RECURRENT_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "marian": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "mbart": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "megatron-bert": (NO_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "mellum": ALL,
    "mimo_v2_flash": (E, SINKS, SINKS, E, E),
    "minicpm3": ALL,
    "minicpm5_moe": (E, NORM_BEFORE_O, NORM_BEFORE_O, E, E),
    "minimax": (RECURRENT_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "minimax_m2": ALL,
    "minimax_m3_vl_text": ALL,
    "ministral": ALL,
    "ministral3": ALL,
    "mistral": ALL,
    "mixtral": ALL,
    "mllama": ALL,
    "modernbert-decoder": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "moshi": (WINDOW_CACHE, WINDOW_CACHE, E, NOT_LINEAR, NO_LORA_TARGET),
    "moss_transcribe_diarize": ALL,
    "mpt": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "musicgen": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "musicgen_melody": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "mvp": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "nanochat": ALL,
    "nemotron": ALL,
    "nemotron_h": (RECURRENT_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "olmo": ALL,
    "olmo2": ALL,
    "olmo3": ALL,
    "olmo_hybrid": (RECURRENT_CACHE, LINEAR, LINEAR, E, E),
    "olmoe": ALL,
    "openai-gpt": (NO_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "opt": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "param2moe": ALL,
    "pegasus": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "persimmon": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "phi": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "phi3": ALL,
    "phi4_multimodal": ALL,
    "phimoe": ALL,
    "plbart": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "prophetnet": (NO_CONTINUATION, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "qwen2": ALL,
    "qwen2_moe": ALL,
    "qwen3": ALL,
    "qwen3_5": (RECURRENT_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "qwen3_5_moe": (RECURRENT_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "qwen3_5_moe_text": (RECURRENT_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "qwen3_5_text": (RECURRENT_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "qwen3_moe": ALL,
    "qwen3_next": (RECURRENT_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "qwen4_exp": (RECURRENT_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "qwen4_exp_text": (RECURRENT_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "recurrent_gemma": (NO_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "reformer": (NO_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "rembert": (NO_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "roberta": (NO_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "roberta-prelayernorm": (NO_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "roc_bert": (NO_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "roformer": (NO_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "rwkv": (NO_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "sarvam_mla": ALL,
    "sarvam_moe": ALL,
    "seed_oss": ALL,
    "smollm3": ALL,
    "solar_open": ALL,
    "stablelm": ALL,
    "starcoder2": ALL,
    "trocr": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "vaultgemma": ALL,
    "whisper": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "xglm": (E, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "xlm": (NO_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "xlm-roberta": (NO_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "xlm-roberta-xl": (NO_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "xlnet": (NO_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "xlstm": (RECURRENT_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "xmod": (NO_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, NO_LORA_TARGET),
    "youtu": ALL,
    "zamba": (RECURRENT_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "zamba2": (RECURRENT_CACHE, NO_O_PROJ, NO_O_PROJ, NO_O_PROJ, E),
    "zaya": (RECURRENT_CACHE, RECURRENT_CACHE, LAYER_STATE, E, E),
}

EXAMPLES = [  # prompts longer than the window, multi-token answers, unequal lengths
    Example.with_choices("Pick one of these: (A) red (B) blue\nAnswer:", ["A", "B"], 1),
    Example.with_choices("Which one of them is cold?", ["ice cream", "fire"], 0),
    Example.with_choices("Q: the longest question of all, padded against the rest?\nA:", ["x y z", "w"], 0),
]


@pytest.fixture(autouse=True)
def reference_attention_one_thread(monkeypatch):
    monkeypatch.setattr(headmap.attention, "INTERPRET", False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # models this small only lose to threading overhead, badly so on a busy machine
    yield
    torch.set_num_threads(threads)


def close(got, expected, what):
    scale = expected.abs().max().clamp(min=1.0)
    err = (got - expected).abs().max() / scale
    assert err < 2e-4, f"{what}: relative error {err:.2e}"


def padded_batch(layers, heads):
    g = torch.Generator().manual_seed(0)
    lengths = [14, 11, 8]  # right-padded, longer than the window
    ids = torch.randint(3, 500, (3, max(lengths)), generator=g)
    pad = torch.tensor([[1] * n + [0] * (max(lengths) - n) for n in lengths])
    return ids, pad, lengths, torch.rand(layers, 3, heads, generator=g) < 0.4


def check_evaluate(model, tok, circuit):
    close(torch.tensor(score_examples(model, tok, EXAMPLES, progress=False)),
          torch.tensor(choice_scores_one_by_one(model, tok, EXAMPLES)), "scores")


def check_mask(model, tok, circuit):
    """Per-row head masks on a right-padded batch against hooks, and masked scores against one stock forward per
    choice with the circuit's heads zeroed by hooks."""
    config = model.config.get_text_config()
    layers, heads = config.num_hidden_layers, getattr(config, "num_attention_heads", 1)
    ids, pad, lengths, mask = padded_batch(layers, heads)
    with mask_heads(model, mask):  # ours first: a refusal comes before the reference's own hooks fail
        got = model(input_ids=ids, attention_mask=pad).logits
    handles = ablate_with_hooks(model, mask)
    try:
        expected = model(input_ids=ids, attention_mask=pad).logits
    finally:
        for h in handles:
            h.remove()
    for row, n in enumerate(lengths):
        close(got[row, :n], expected[row, :n], f"masked logits, row {row}")
    handles = ablate_with_hooks(model, circuit)
    try:
        with_circuit = torch.tensor(choice_scores_one_by_one(model, tok, EXAMPLES))
    finally:
        for h in handles:
            h.remove()
    dense = torch.zeros(layers, heads, dtype=torch.bool)
    for layer, hs in circuit.items():
        dense[layer, hs] = True
    with mask_heads(model, dense):
        close(torch.tensor(score_examples(model, tok, EXAMPLES, progress=False)), with_circuit, "masked scores")


def check_locate(model, tok, circuit):
    state = {}
    got_circuit, _ = locate_circuit(model, answer_samples(tok, EXAMPLES), 1, 5, state=state)
    want_circuit, want_losses, want_below = locate_brute_force(model, tok, EXAMPLES, 1)
    close(torch.tensor(state["loss_matrix"]), torch.tensor(want_losses), "locate's loss matrix")
    close(torch.tensor(state["circuit_below_loss"]), torch.tensor(want_below), "locate's circuit-below loss")
    assert got_circuit == want_circuit


def starts_as_base(model, attach):
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    base = model(input_ids=ids).logits
    adapter = attach()
    try:
        close(model(input_ids=ids).logits, base, f"{adapter.method} at initialisation")
    finally:
        adapter.remove()


def check_headmap(model, tok, circuit):
    for variant in ("mha", "hs"):
        starts_as_base(model, lambda: attach_headmap(model, circuit, 8, 1.0, variant))


def check_lora(model, tok, circuit):
    for dora in (False, True):
        starts_as_base(model, lambda: attach_lora(model, 4, 8, 0.0, dora=dora))


@torch.no_grad()
def status(model_type):
    """'cannot build: ...', or one entry per column: "exact" or the refusal's message."""
    try:
        model = tiny_model(model_type)
    except Exception as err:  # noqa: BLE001 - a type whose tiny config cannot be built is reported as such
        return f"cannot build: {type(err).__name__}"
    try:  # the stock model itself, as load_model checks it: a type transformers cannot run is refused whole
        probe(model)
    except UnsupportedModel as err:
        assert type(model).__name__ in str(err), err
        return (str(err),) * len(COLUMNS)
    config = model.config.get_text_config()  # Mamba names no heads, multimodal wrappers no layers
    tok, heads = TinyTokenizer(), getattr(config, "num_attention_heads", 1)
    circuit = {layer: [layer % heads] for layer in range(config.num_hidden_layers)}
    got = []
    for check in (check_evaluate, check_mask, check_locate, check_headmap, check_lora):
        try:
            check(model, tok, circuit)
            got.append(E)
        except UnsupportedModel as err:  # a refusal names the architecture or its attention class
            assert type(model).__name__.removesuffix("ForCausalLM") in str(err) or "Attention" in str(err), err
            got.append(str(err))
        except ValueError as err:  # lora_targets: none of the protocol's projections
            assert check is check_lora and "has none of the LoRA targets" in str(err), err
            got.append(str(err))
    return tuple(got)


@pytest.mark.parametrize("model_type", causal_lm_types())
def test_every_decoder_is_exact_or_refused(model_type):
    got = status(model_type)
    assert model_type in EXPECTED, f"new type {model_type}: {got}"
    expect = EXPECTED[model_type]
    if isinstance(expect, str):  # its tiny config cannot be built: nothing of ours to check
        assert isinstance(got, str) and got.startswith(expect), got
        return
    assert not isinstance(got, str), got
    for column, want, have in zip(COLUMNS, expect, got):
        assert have == E if want == E else (have != E and want in have), f"{column}: {have}"


# the types whose final logits the chunked loss (train_adapter's loss_chunks, finetune's --loss-chunks) does not
# reproduce, refused by name: logits scaled or capped in their own way, or the LM head not called once on every
# position. Every other type that runs gives the loss of its own logits.
CHUNKS_REFUSED = {"hyperclovax", "minicpm3", "musicgen", "musicgen_melody", "prophetnet", "recurrent_gemma", "xlstm"}


@pytest.mark.parametrize("model_type", causal_lm_types())
def test_the_chunked_loss_is_the_models_own_or_refused(model_type):
    """summed_nll over 3 slices of the positions against the loss of the model's own whole logits, with the same
    random state (Reformer draws its hashes)."""
    if isinstance(EXPECTED.get(model_type), str):
        return  # its tiny config cannot be built: nothing to check
    model = tiny_model(model_type)
    try:
        probe(model)
    except UnsupportedModel:
        return  # refused whole, as test_every_decoder_is_exact_or_refused checks
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.masked_fill(torch.arange(9) < 3, -100)
    with torch.no_grad():
        torch.manual_seed(0)
        whole = summed_nll(model, ids, None, labels)
        torch.manual_seed(0)
        try:
            chunked = summed_nll(model, ids, None, labels, loss_chunks=3)
        except UnsupportedModel as err:
            assert model_type in CHUNKS_REFUSED and type(model).__name__ in str(err), err
            return
    assert model_type not in CHUNKS_REFUSED
    close(chunked, whole, "the chunked loss")


# docs/architectures.md's wording of each refusal, column by column where it differs
LABELS = {E: "exact", SINKS: "refused: attention sinks", INDICES: "refused: sparse attention",
          DIFFERENTIAL: "refused: differential attention", NORM_BEFORE_O: "refused: norm or gate before o_proj",
          LINEAR: "refused: linear-attention layers", FLOAT_MASK: "refused: float attention mask",
          LAYER_STATE: "refused: layers pass extra state", HS_SHAPE: "MHA exact; HS refused (several residual streams)",
          NO_O_PROJ: "refused: no o_proj attention per layer", NO_LORA_TARGET: "refused: none of q/k/v/up/down",
          RECURRENT_CACHE: "one-token answers only (recurrent cache)", NO_CACHE: "one-token answers only (no cache)",
          NO_LAYER_LIST: "refused: two attention modules per layer", POSITION_BIAS: "refused: position bias",
          WINDOW_CACHE: "refused when prompts outgrow the window (the model ignores its cache's window)",
          NO_CONTINUATION: "one-token answers only (cannot continue its cache)",
          NOT_LINEAR: "refused: o_proj is not a linear layer", STACKED_STATE: "refused: layers pass stacked streams",
          STOCK_FAILS: "refused: transformers' own forward fails"}


def readme_table() -> str:
    """docs/architectures.md's support table: model types with the same row of EXPECTED together, most types first."""
    rows: dict[tuple, list[str]] = {}
    for model_type, expect in EXPECTED.items():
        row = (f"not checked: {expect}",) + ("",) * (len(COLUMNS) - 1) if isinstance(expect, str) else tuple(
            LABELS[cell] for cell in expect)
        rows.setdefault(row, []).append(model_type)
    lines = ["| model types | evaluate | mask | locate | HeadMap | LoRA/DoRA |", "|---|---|---|---|---|---|"]
    for row, types in sorted(rows.items(), key=lambda item: (item[0][0].startswith("not"), -len(item[1]))):
        lines.append(f"| {', '.join(types)} | {' | '.join(row)} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m tests.test_architectures > table.md: paste it into docs/architectures.md
    print(readme_table())
