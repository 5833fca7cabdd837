"""Tiny random models of every causal-LM type the installed transformers offers, shaped so that every feature
that can go wrong shows: a sliding window shorter than the sequences, small soft-caps, logit scaling, both
kinds of layer where a model mixes full and sliding attention layers."""
import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

VOCAB, WINDOW, MAX_PARAMETERS = 512, 4, 3_000_000  # TinyTokenizer's vocabulary; a window shorter than every test sequence
SIZE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=2,
            eos_token_id=1, initializer_range=0.1, tie_word_embeddings=False,
            # mixture-of-experts and other shapes, where a config has them
            moe_intermediate_size=32, intermediate_size_mlp=96, num_experts=4, num_local_experts=4, n_routed_experts=4,
            num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1,
            shared_expert_intermediate_size=32,
            partial_rotary_factor=0.5, rotary_dim=8, vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=16,
            # encoder-decoders' decoders (BART's family), and their encoders
            d_model=64, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=96, encoder_layers=1,
            encoder_attention_heads=4, encoder_ffn_dim=96)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)
PER_TYPE = {"zaya": dict(num_experts_per_tok=1),  # what a type's own validation insists on
            # hybrids: an attention layer within the 2 layers
            "jamba": dict(attn_layer_offset=1, attn_layer_period=2, expert_layer_offset=1, expert_layer_period=2),
            "bamba": dict(attn_layer_indices=[1]),
            "longcat_flash": dict(num_layers=2, zero_expert_num=2),
            "falcon_h1": dict(mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=16, mamba_chunk_size=16),
            "granitemoehybrid": dict(layer_types=["linear_attention", "attention"]),
            "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
            "recurrent_gemma": dict(block_types=["recurrent", "attention"]),
            "dory": dict(num_hidden_layers=3, layer_types=["sliding_attention"] * 2 + ["full_attention"],
                         n_input_layers=1, n_recurrent_layers=1, n_output_layers=1),
            "cohere_compass_text": dict(layer_types=(kinds := ["sliding_attention", "full_attention"]),
                                        rope_parameters={k: {"rope_type": "default", "rope_theta": 1e4} for k in kinds}),
            "qwen4_exp": (qwen4 := dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=4,
                                        indexer_compress_ratio=2, linear_key_head_dim=16, linear_value_head_dim=16,
                                        linear_num_key_heads=2, linear_num_value_heads=4)),
            "qwen4_exp_text": qwen4,
            "dots3_note": dict(head_dim=16), "dots3_note_text": dict(head_dim=16),  # its sliding layers' heads: nope+rope
            # the last 2 of 4 layers reuse the keys and values of the last earlier layer of their kind
            "gemma3n_text": dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                                 num_kv_shared_layers=2, activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0]),
            "musicgen": dict(num_codebooks=1), "musicgen_melody": dict(num_codebooks=1),
            "xmod": dict(default_language="en_XX"),
            "mamba2": dict(num_heads=8, head_dim=16, n_groups=1), "xlnet": dict(d_head=16),
            "kimi_linear": dict(linear_head_dim=16, linear_num_heads=4),
            "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
            "cpmant": dict(dim_head=16, dim_ff=96, prompt_types=4, prompt_length=2, segment_types=4,
                           position_bias_num_buckets=32, position_bias_max_distance=64),
            "inkling2_text": (inkling2 := dict(swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16,
                                               d_rel=4, sliding_window_size=WINDOW, unpadded_vocab_size=VOCAB,
                                               n_layers_per_attn_res_block=1)),
            "inkling2_loop_text": inkling2,
            "moshi": dict(ffn_dim=96), "moshi.depth_decoder_config": dict(ffn_dim=64),
            "roc_bert": dict(pronunciation_embed_dim=16, shape_embed_dim=16, pronunciation_vocab_size=32,
                             shape_vocab_size=32),
            "ergo": dict(first_dense_intermediate_size=96, shared_intermediate_size=32),
            # 3 layers: a sliding one, an indexer, and an indexed layer reading the indexer's keys and values
            "kolibri1_1": dict(num_hidden_layers=3, layer_types=["sliding_attention"] + ["indexed_attention"] * 2,
                               index_layers=[1], kv_source_layers=[0, 1, 1], mlp_only_layers=[0],
                               mlp_only_intermediate_size=96, index_num_heads=2, index_topk=4, index_pool_size=16,
                               index_compression=2, index_num_local_tokens=2, index_num_sink_tokens=1),
            "xlstm": dict(embedding_dim=64, num_heads=4, num_blocks=2, qk_dim_factor=1.0),
            "reformer": dict(is_decoder=True, axial_pos_embds_dim=[32, 32], axial_pos_shape=[16, 16],
                             attention_head_size=16, feed_forward_size=96, local_attn_chunk_length=4,
                             lsh_attn_chunk_length=4),
            "dbrx.attn_config": dict(rope_theta=10000.0, kv_n_heads=2, clip_qkv=8.0),
            "dbrx.ffn_config": dict(hidden_size=64, ffn_hidden_size=96),
            "blt": dict(encoder_hash_byte_group_vocab=64),
            "phi4_multimodal.audio_config": dict(num_blocks=1, nemo_conv_channels=16, ext_pw_out_channel=32,
                                                 depthwise_separable_out_channel=32)}
# features forced on where a config has them, at sizes where getting them wrong shows
FORCED = dict(sliding_window=WINDOW, use_sliding_window=True, attention_chunk_size=WINDOW, attn_logit_softcapping=2.0,
              final_logit_softcapping=3.0, logits_scaling=4.0, logit_scale=0.5, max_window_layers=0)


def causal_lm_types() -> list[str]:
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def settable(config, name: str) -> bool:
    """Whether `name` is one of the config's own fields (not a read-only property derived from others)."""
    prop = getattr(type(config), name, None)
    known = name in config.to_dict() or name in getattr(config, "attribute_map", {})  # n_embd as hidden_size
    return known and not (isinstance(prop, property) and prop.fset is None)


def causal_lm_class(model_type: str):
    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def per_layer_overrides(fields: dict, layers: int) -> dict:
    """Cut every per-layer field (a list, or a dict keyed by layer index, as long as the default's layers) to a
    few of the default's layers: one of each kind of layer the model mixes (the distinct combinations of its
    string per-layer fields), at least 2, full attention last: some types insist on it, and would quietly turn a
    sliding last layer into a full one."""
    lists = {k: v for k, v in fields.items() if isinstance(v, list) and len(v) == layers}
    kinds = [tuple(v[i] for v in lists.values() if isinstance(v[i], str)) for i in range(layers)]
    first = {}
    for i, kind in enumerate(kinds):
        first.setdefault(kind, i)
    keep = sorted(first.values(), key=lambda i: ("full_attention" in kinds[i], i))
    keep = keep if len(keep) >= 2 else list(range(min(2, layers)))
    overrides = {k: [v[i] for i in keep] for k, v in lists.items()}
    for k in overrides:  # per-layer sizes (Laguna's heads per layer): ours
        if k.removesuffix("_per_layer") in SIZE:
            overrides[k] = [SIZE[k.removesuffix("_per_layer")]] * len(keep)
    for k, v in fields.items():  # per-layer exceptions keyed by layer index (Gemma 4's wider global layers)
        if isinstance(v, dict) and v and all(str(key).isdigit() and isinstance(x, dict) for key, x in v.items()):
            v = {int(key): value for key, value in v.items()}
            overrides[k] = {new: {**v[old], **{name: SIZE[name] for name in v[old] if name in SIZE}}
                            for new, old in enumerate(keep) if old in v}
            for layer in overrides[k].values():  # multi-head latent attention, as below
                if layer.get("kv_lora_rank"):
                    layer["num_key_value_heads"] = SIZE["num_attention_heads"]
    return {"num_hidden_layers": len(keep), **overrides} if lists else {}


def sized(config, sizes: dict, extra: dict, forced: dict) -> dict:
    """The overrides that make one (sub-)config tiny: `sizes` where it has those fields, its per-layer fields cut
    to match, the type's own `extra`, and the features in `forced` switched on where it has them on."""
    fields = config.to_dict()  # not hasattr: a per-layer config (Gemma 4) raises on reading a global head_dim
    overrides = {k: v for k, v in sizes.items() if settable(config, k)}
    layers = fields.get("num_hidden_layers")
    if isinstance(layers, int) and settable(config, "num_hidden_layers") and "num_hidden_layers" not in extra:
        per_layer = per_layer_overrides(fields, layers)  # our sizes win over per-layer sizes (Gemma 3n's widths)
        overrides.update({k: v for k, v in per_layer.items() if settable(config, k) and (
            k not in sizes or k == "num_hidden_layers")})
    if fields.get("kv_lora_rank"):  # multi-head latent attention: as many key/value heads as query heads, and
        overrides["num_key_value_heads"] = SIZE["num_attention_heads"]  # the rotary part is its head_dim
        overrides["head_dim"] = SIZE["qk_rope_head_dim"]
    overrides.update(extra)  # as given: DBRX's attention reads a field its config class lacks
    overrides.update({k: v for k, v in forced.items() if settable(config, k) and (
        fields.get(k, getattr(config, k, None)) not in (None, False) or k == "use_sliding_window")})
    return overrides


def tiny_config(model_type: str):
    config_class = causal_lm_class(model_type).config_class  # Musicgen's causal LM takes its decoder's config
    default = config_class()
    text = getattr(default, "text_config", None)  # multimodal wrappers: the text model as above
    main = sized(text or default, SIZE, PER_TYPE.get(model_type, {}), FORCED)
    parts = {"text_config": {**text.to_dict(), **main}} if text is not None else main
    for name in getattr(default, "sub_configs", {}):  # vision and audio towers, and other parts: the smallest
        sub = getattr(default, name, None)
        if name != "text_config" and sub is not None:
            parts[name] = {**sub.to_dict(), **sized(sub, {**SIZE, **VISION}, PER_TYPE.get(f"{model_type}.{name}", {}), {})}
    if settable(default, "mm_tokens_per_image"):
        parts["mm_tokens_per_image"] = (VISION["image_size"] // VISION["patch_size"]) ** 2
    return config_class(**parts)


def tiny_model(model_type: str, seed: int = 0):
    """The tiny model, in eval mode, with sdpa attention where the type has it (else eager)."""
    config, model_class = tiny_config(model_type), causal_lm_class(model_type)
    with torch.device("meta"):  # a config our size names do not reach would build a full-size model: refuse it
        size = sum(p.numel() for p in model_class._from_config(config).parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"the tiny config still has {size:,} parameters")
    torch.manual_seed(seed)
    for implementation in ("sdpa", "eager"):
        try:
            config._attn_implementation = implementation
            return model_class._from_config(config, attn_implementation=implementation).eval()
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
