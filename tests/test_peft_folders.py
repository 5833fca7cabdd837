"""LoRA folders as stock PEFT writes them, with the options researchers set (rsLoRA, a regular expression for
target_modules, lora_bias, per-module ranks and alphas, chosen layers, excluded modules): load_adapter computes
what PEFT computes, merged and hooked, and refuses only what is not LoRA arithmetic. An adapter loaded in a
notebook scores as PEFT's does: it comes back in eval mode, and model.train() / model.eval() reach it."""
import json
import os

import pytest
import torch

from headmap.adapters import attach_headmap
from headmap.merging import merge_adapter
from headmap.saving import load_adapter, save_adapter
from tests.conftest import needed, tiny_llama

peft = needed("peft")


def base():
    return tiny_llama(layers=3, heads=4, kv_heads=2, head_dim=16, seed=5).requires_grad_(False)


def peft_folder(folder, **options):
    """A LoRA that stock PEFT made and saved, every weight of it (biases too) moved off its initial value."""
    reference = peft.get_peft_model(base(), peft.LoraConfig(**options))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    reference.save_pretrained(str(folder))
    return str(folder)


OPTIONS = {
    "rslora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True),
    "regex": dict(r=4, lora_alpha=8, target_modules=r".*layers\.[02]\.self_attn\.(q|o)_proj"),
    "lora_bias": dict(r=4, lora_alpha=8, target_modules=["o_proj", "up_proj"], lora_bias=True),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"],
                     rank_pattern={"k_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}, alpha_pattern={"down_proj": 3}),
    "layers": dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], layers_to_transform=[0, 2],
                   layers_pattern="layers"),
    "exclude": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], exclude_modules=r".*\.1\.self_attn\.v_proj"),
    "dora_rslora": dict(r=4, lora_alpha=8, target_modules=["v_proj", "gate_proj"], use_dora=True, use_rslora=True),
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_a_stock_peft_lora_loads_and_merges_as_peft_computes_it(name, tmp_path):
    folder = peft_folder(tmp_path / name, **OPTIONS[name])
    x = torch.randint(0, 512, (2, 11))
    with torch.no_grad():
        reference = peft.PeftModel.from_pretrained(base(), folder)  # inference mode, as PEFT returns it
        want = reference(x).logits
        assert not torch.allclose(want, base()(x).logits, atol=1e-4)  # the adapter does act
        model = base()
        adapter = load_adapter(model, folder)  # no .eval() of ours: it comes back ready to score
        torch.testing.assert_close(model(x).logits, want, rtol=1e-5, atol=1e-5)
        sites = {site.replace("/", ".") for site in adapter.sites}
        assert sites == {n for n, m in reference.base_model.model.named_modules() if hasattr(m, "lora_A")}
        torch.testing.assert_close(merge_adapter(model, adapter)(x).logits, want, rtol=1e-5, atol=1e-5)


def test_headmaps_adapter_without_its_headmap_json_still_loads_as_the_lora_it_is(tmp_path):
    model = base()
    adapter = attach_headmap(model, {0: [1, 3], 2: [0]}, rank=4, scaling=0.5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    x = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        want = model(x).logits
    save_adapter(adapter, str(tmp_path))
    os.remove(tmp_path / "headmap.json")  # copied or uploaded without it: a plain PEFT LoRA with lora_bias
    fresh = base()
    loaded = load_adapter(fresh, str(tmp_path))
    assert loaded.method == "lora" and json.loads((tmp_path / "adapter_config.json").read_text())["lora_bias"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, want, rtol=1e-5, atol=1e-5)
        merged = merge_adapter(fresh, loaded)
        assert merged.config.attention_bias  # o_proj took the bias
        torch.testing.assert_close(merged(x).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("option, message", [
    (dict(modules_to_save=["lm_head"]), "PEFT option modules_to_save=['lm_head'] is not LoRA arithmetic"),
    (dict(bias="all"), "PEFT option bias='all' trains the model's own biases"),
    (dict(target_modules=r".*\.mlp"), "match model.layers.0.mlp, a LlamaMLP: LoRA is supported here on linear layers"),
])
def test_what_is_not_lora_arithmetic_is_refused_by_name(option, message, tmp_path):
    config = json.loads(open(peft_folder(tmp_path, r=4, target_modules=["q_proj"]) + "/adapter_config.json").read())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | option))
    model = base()
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_adapter(model, str(tmp_path))
    assert "_headmap_adapter" not in model.__dict__  # nothing stays attached


def test_a_loaded_adapter_scores_as_peft_and_model_train_and_eval_reach_it(tmp_path):
    folder = peft_folder(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                         lora_dropout=0.3)
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(base(), folder)(x).logits
        model = base().train()  # a notebook's model, left in training mode by an earlier cell
        load_adapter(model, folder)
        model.eval()
        torch.testing.assert_close(model(x).logits, want, rtol=1e-5, atol=1e-5)
        model.train()  # dropout on, as on PEFT's model after .train()
        torch.manual_seed(0)
        first = model(x).logits
        assert not torch.allclose(first, want, atol=1e-3) and not torch.allclose(first, model(x).logits, atol=1e-3)
        model.eval()
        torch.testing.assert_close(model(x).logits, want, rtol=1e-5, atol=1e-5)


def test_adapter_train_wakes_only_the_adapter_and_its_dropout(tmp_path):
    folder = peft_folder(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=0.5)
    model = base()
    adapter = load_adapter(model, folder)
    x = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        still = model(x).logits
        adapter.train()  # what train_adapter does: the model's own modules stay in eval mode
        assert not model.training and not model.model.layers[0].mlp.training
        assert not torch.allclose(model(x).logits, still, atol=1e-4)
        adapter.eval()
        torch.testing.assert_close(model(x).logits, still)
