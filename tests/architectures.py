"""Tiny random models of every causal-LM type the installed transformers offers, shaped so that every feature
that can go wrong shows: a sliding window shorter than the sequences, small soft-caps, logit scaling, both
kinds of layer where a model mixes full and sliding attention layers."""
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

VOCAB, WINDOW, MAX_PARAMETERS = 512, 4, 3_000_000  # TinyTokenizer's vocabulary; a window shorter than every test sequence
SIZE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=2,
            eos_token_id=1, initializer_range=0.1, tie_word_embeddings=False,
            # mixture-of-experts and other shapes, where a config has them
            moe_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1, shared_expert_intermediate_size=32,
            partial_rotary_factor=0.5, rotary_dim=8, vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=16)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)
PER_TYPE = {"zaya": dict(num_experts_per_tok=1),  # what a type's own validation insists on
            # hybrids: an attention layer within the 2 layers
            "jamba": dict(attn_layer_offset=1, attn_layer_period=2, expert_layer_offset=1, expert_layer_period=2),
            "bamba": dict(attn_layer_indices=[1]),
            "longcat_flash": dict(num_layers=2, zero_expert_num=2),
            "falcon_h1": dict(mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=16, mamba_chunk_size=16)}
# features forced on where a config has them, at sizes where getting them wrong shows
FORCED = dict(sliding_window=WINDOW, use_sliding_window=True, attn_logit_softcapping=2.0,
              final_logit_softcapping=3.0, logits_scaling=4.0, logit_scale=0.5, max_window_layers=0)


def causal_lm_types() -> list[str]:
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def settable(config, name: str) -> bool:
    """Whether `name` is one of the config's own fields (not a read-only property derived from others)."""
    prop = getattr(type(config), name, None)
    known = name in config.to_dict() or name in getattr(config, "attribute_map", {})  # n_embd as hidden_size
    return known and not (isinstance(prop, property) and prop.fset is None)


def tiny_config(model_type: str):
    default = AutoConfig.for_model(model_type)
    text = getattr(default, "text_config", None) or default  # multimodal wrappers: size the text model
    fields = text.to_dict()  # not hasattr: a per-layer config (Gemma 4) raises on reading a global head_dim
    overrides = {k: v for k, v in {**SIZE, **PER_TYPE.get(model_type, {})}.items() if settable(text, k)}
    overrides.update({k: v for k, v in FORCED.items() if settable(text, k) and (
        fields.get(k, getattr(text, k, None)) not in (None, False) or k == "use_sliding_window")})
    if fields.get("kv_lora_rank"):  # multi-head latent attention: as many key/value heads as query heads, and
        overrides["num_key_value_heads"] = SIZE["num_attention_heads"]  # the rotary part is its head_dim
        overrides["head_dim"] = SIZE["qk_rope_head_dim"]
    # full attention last: some types insist on it, and would quietly turn a sliding last layer into a full one
    kinds = sorted(set(fields.get("layer_types") or []), key=lambda kind: (kind == "full_attention", kind))
    if kinds and settable(text, "layer_types"):  # every kind of layer the model mixes, in 2 layers or one per kind
        overrides["num_hidden_layers"] = max(2, len(kinds))
        overrides["layer_types"] = [kinds[i % len(kinds)] for i in range(overrides["num_hidden_layers"])]
    if text is default:
        return AutoConfig.for_model(model_type, **overrides)
    wrapper = {"text_config": {**text.to_dict(), **overrides}}
    vision = getattr(default, "vision_config", None)
    if vision is not None:  # a multimodal wrapper builds its vision tower too: the smallest that still works
        wrapper["vision_config"] = {**vision.to_dict(), **{k: v for k, v in VISION.items() if settable(vision, k)}}
        if settable(default, "mm_tokens_per_image"):
            wrapper["mm_tokens_per_image"] = (VISION["image_size"] // VISION["patch_size"]) ** 2
    return AutoConfig.for_model(model_type, **wrapper)


def tiny_model(model_type: str, seed: int = 0):
    """The tiny model, in eval mode, with sdpa attention where the type has it (else eager)."""
    config = tiny_config(model_type)
    with torch.device("meta"):  # a config our size names do not reach would build a full-size model: refuse it
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"the tiny config still has {size:,} parameters")
    torch.manual_seed(seed)
    for implementation in ("sdpa", "eager"):
        try:
            config._attn_implementation = implementation
            return AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()
        except (ValueError, ImportError) as err:
            last = err
    raise last


if __name__ == "__main__":  # a survey: which types build
    for t in causal_lm_types():
        try:
            m = tiny_model(t)
            print(f"{t:28s} built {type(m).__name__} {sum(p.numel() for p in m.parameters()):,}")
        except Exception as e:  # noqa: BLE001
            print(f"{t:28s} FAILED {type(e).__name__}: {str(e)[:150]!r}")
    print(transformers.__version__)
