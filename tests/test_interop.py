"""LoRA and DoRA against PEFT (the independent reference), PEFT's file layout both ways, and merged checkpoints."""
import json

import pytest
import torch

from headmap.adapters import attach_headmap, attach_lora
from headmap.merging import merge_adapter
from headmap.saving import load_adapter, save_adapter
from tests.conftest import ROOT, needed, tiny_llama

peft = needed("peft")
TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def base(seed=5):
    return tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16, seed=seed).requires_grad_(False)


def randomise(adapter, seed=0):
    """Non-zero B and a magnitude away from ||W0||: at initialisation every variant is the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(p + 0.1 * torch.randn(p.shape, generator=g))


def ours_and_peft(dora, dropout):
    """Our adapter on one copy of the model and PEFT's on another, with the same weights."""
    ours_model, peft_model = base(), base()
    adapter = attach_lora(ours_model, rank=4, alpha=8, dropout=dropout, dora=dora)
    randomise(adapter)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=list(TARGETS), use_dora=dora)
    reference = peft.get_peft_model(peft_model, config)
    with torch.no_grad():
        for site, lora in adapter.sites.items():
            layer = reference.base_model.model.get_submodule(site.replace("/", "."))
            layer.lora_A["default"].weight.copy_(lora.A.weight)
            layer.lora_B["default"].weight.copy_(lora.B.weight)
            if dora:
                layer.lora_magnitude_vector["default"].weight.copy_(lora.magnitude)
    return ours_model, adapter, reference


def peft_grads(reference):
    return {name: p.grad for name, p in reference.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_logits_and_gradients_equal_peft(dora, mode):
    ours_model, adapter, reference = ours_and_peft(dora, dropout=0.3)
    adapter.train(mode == "train")
    reference.train(mode == "train")
    x = torch.randint(0, 512, (2, 12))
    torch.manual_seed(7)  # the same dropout masks: both draw them in the same module order
    ours = ours_model(x).logits
    torch.manual_seed(7)
    theirs = reference(x).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    if mode == "train":
        assert not torch.allclose(ours, base()(x).logits, atol=1e-3)  # dropout and the adapter did act
    ours.square().mean().backward()
    theirs.square().mean().backward()
    grads = peft_grads(reference)
    for site, lora in adapter.sites.items():
        prefix = f"base_model.model.{site.replace('/', '.')}"
        torch.testing.assert_close(lora.A.weight.grad, grads[f"{prefix}.lora_A.default.weight"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(lora.B.weight.grad, grads[f"{prefix}.lora_B.default.weight"], rtol=1e-4, atol=1e-6)
        if dora:
            torch.testing.assert_close(lora.magnitude.grad, grads[f"{prefix}.lora_magnitude_vector.default.weight"],
                                       rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_loads_our_folder_and_we_load_peft_folders(dora, tmp_path):
    model = base()
    adapter = attach_lora(model, rank=4, alpha=8, dropout=0.05, dora=dora)
    randomise(adapter)
    adapter.eval()
    x = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        ours = model(x).logits
    save_adapter(adapter, str(tmp_path / "ours"))
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] == dora and config["r"] == 4
    reference = peft.PeftModel.from_pretrained(base(), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reference(x).logits, ours, rtol=1e-5, atol=1e-5)
        reference.save_pretrained(str(tmp_path / "peft"))  # PEFT's own writing, read back by us
        fresh = base()
        load_adapter(fresh, str(tmp_path / "peft")).eval()
        torch.testing.assert_close(fresh(x).logits, ours, rtol=1e-5, atol=1e-5)


def test_headmap_scaling_multiplies_the_whole_map():
    model = base()
    adapter = attach_headmap(model, {1: [0, 2]}, rank=4, scaling=0.5)
    randomise(adapter)
    hm, o_proj = adapter.sites["1"], model.model.layers[1].self_attn.o_proj
    x = torch.randn(3, 64)
    x_r = torch.cat([x[:, 0:16], x[:, 32:48]], -1)
    expected = x @ o_proj.weight.T + 0.5 * ((x_r @ hm.down.weight.T + hm.down.bias) @ hm.up.weight.T + hm.up.bias)
    torch.testing.assert_close(o_proj(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["headmap", "lora", "dora"])
def test_merged_checkpoint_equals_the_hooked_adapter(method, tmp_path):
    from transformers import AutoModelForCausalLM
    model = base()
    if method == "headmap":
        adapter = attach_headmap(model, {0: [1, 3], 1: [2]}, rank=4, scaling=0.7)
    else:
        adapter = attach_lora(model, rank=4, alpha=8, dropout=0.05, dora=method == "dora")
    randomise(adapter)
    adapter.eval()
    x = torch.randint(0, 512, (2, 14))
    with torch.no_grad():
        hooked = model(x).logits
        merged = merge_adapter(model, adapter)
        merged.save_pretrained(str(tmp_path))
        plain = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()  # no code of ours involved
        assert (plain.config.attention_bias is True) == (method == "headmap")
        torch.testing.assert_close(plain(x).logits, hooked, rtol=1e-5, atol=1e-5)


def test_merge_refuses_what_it_cannot_express():
    from transformers import MistralConfig, MistralForCausalLM
    model = base()
    with pytest.raises(ValueError, match="HS adapter cannot be merged"):
        merge_adapter(model, attach_headmap(model, {0: [1]}, rank=4, variant="hs"))
    mistral = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    with pytest.raises(ValueError, match="no attention_bias switch"):
        merge_adapter(mistral, attach_headmap(mistral, {0: [1]}, rank=4))


# ---------------------------------------------------------------- HeadMap's MHA adapter in PEFT's LoRA layout

def headmap_folder(model, folder, dtype=torch.float32):
    """A trained-looking HeadMap MHA adapter on `model` (the model in `dtype`), saved to `folder`; returns our logits
    with it attached and the inputs, the adapter removed afterwards."""
    adapter = attach_headmap(model, {0: [1, 3], 1: [2]}, rank=4, scaling=0.7)
    randomise(adapter)
    adapter.eval()
    x = torch.randint(0, 500, (2, 11))
    with torch.no_grad():
        ours = model(x).logits.float()
    save_adapter(adapter, str(folder))
    adapter.remove()
    return ours, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_stock_peft_loads_a_headmap_adapter_and_computes_what_it_computes(which, dtype, tmp_path, request):
    """PEFT 0.21, no plug-in: the folder loads without an error or a warning about fields it does not know, and its
    logits equal ours with the HeadMap hooks, on a tiny random LLaMA and on SmolLM2, in fp32 and bf16."""
    import copy
    import warnings
    if which == "smollm2":
        real, _ = request.getfixturevalue("smollm2")
        model = copy.deepcopy(real).to(dtype).requires_grad_(False)
    else:
        model = base().to(dtype)
    ours, x = headmap_folder(model, tmp_path / "hm")
    config = json.loads((tmp_path / "hm" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_bias"] is True and config["r"] == 4
    assert config["lora_alpha"] / config["r"] == 0.7
    assert config["target_modules"] == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reference = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "hm")).eval()
    said = [str(w.message) for w in caught]
    assert not [w for w in said if "nexpected" in w or "unknown" in w.lower() or "ignored" in w], said
    with torch.no_grad():
        theirs = reference(x).logits.float()
    gap, scale = (theirs - ours).abs().max().item(), ours.abs().max().item()
    if dtype == torch.float32:  # float rounding: a few units in the last place of the largest logit
        tolerance = 2 ** -23 * 64 * max(1.0, scale)
    else:  # bf16 rounds through every layer: PEFT and ours may differ as much as bf16 differs from fp32 (plus one
        # unit in the last place of the largest logit), no more
        model.float()
        adapter = load_adapter(model, str(tmp_path / "hm"))
        with torch.no_grad():
            tolerance = (model(x).logits - ours).abs().max().item() + 2 ** -8 * scale
        adapter.remove()
    print(f"{which} {dtype}: max |PEFT - ours| {gap:.3g} of logits up to {scale:.3g} (allowed {tolerance:.3g})")
    assert gap <= tolerance, (gap, tolerance)
    if which == "tiny":
        assert (ours - base().to(dtype)(x).logits.float()).abs().max() > 10 * gap  # the map moved the logits


def test_load_adapter_reads_both_headmap_layouts_and_merges_them(tmp_path):
    model = base()
    ours, x = headmap_folder(model, tmp_path / "peft_form")
    adapter = load_adapter(model, str(tmp_path / "peft_form"))
    assert adapter.method == "headmap" and adapter.config["heads"] == {"0": [1, 3], "1": [2]}
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merge_adapter(model, adapter)(x).logits, ours, rtol=1e-5, atol=1e-5)


def test_an_adapter_the_old_code_wrote_loads_and_computes_what_the_old_code_computed():
    """A folder save_adapter wrote before the PEFT form (HeadMap's own layout), kept as it was written, with its base
    model and the logits the old code computed (tests/fixtures/headmap_mha_2026-12-05/README.md)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    fixture = ROOT / "tests" / "fixtures" / "headmap_mha_2026-12-05"
    expected = load_file(str(fixture / "expected.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(fixture / "base")).eval().requires_grad_(False)
    adapter = load_adapter(model, str(fixture / "adapter"))
    assert adapter.method == "headmap" and adapter.config["heads"] == {"0": [1, 3], "1": [2]}
    with torch.no_grad():
        torch.testing.assert_close(model(expected["input_ids"]).logits, expected["logits"], rtol=1e-5, atol=1e-5)
        merged = merge_adapter(model, adapter)
        torch.testing.assert_close(merged(expected["input_ids"]).logits, expected["logits"], rtol=1e-5, atol=1e-5)


def test_a_lora_on_o_proj_that_is_no_headmap_map_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    model = base()
    headmap_folder(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"][:, 0] = 1.0  # head 0: not in the circuit
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="reads columns outside the circuit's heads"):
        load_adapter(model, str(tmp_path))
    assert "_headmap_adapter" not in model.__dict__  # nothing stays attached


def test_the_hs_variant_keeps_its_own_layout_and_peft_refuses_it_with_its_own_error(tmp_path):
    model = base()
    adapter = attach_headmap(model, {0: [1]}, rank=4, variant="hs")
    save_adapter(adapter, str(tmp_path))
    adapter.remove()
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["variant"] == "hs" and config["peft"].startswith("not loadable: the HS variant adds its map after")
    assert not (tmp_path / "headmap.json").exists()
    with pytest.raises(KeyError, match="peft_type"):
        peft.PeftModel.from_pretrained(model, str(tmp_path))
    assert load_adapter(model, str(tmp_path)).config["variant"] == "hs"
