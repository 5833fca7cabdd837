"""A model larger than one GPU, under torchrun (--fsdp): sharded with PyTorch's FSDP2 over the ranks, only rank 0
reading the weights; and what each rank then holds, read from the shards.

torch is imported inside the functions: --help should not wait for it.
"""
from cli import UsageError


def load_sharded(folder: str, dtype, device, trust_remote_code: bool = False):
    """The model of `folder` sharded with FSDP2 over torchrun's ranks (shard); only rank 0 reads the weights, into
    host memory. Probed once, in eval mode, frozen."""
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    from headmap.masking import probe
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    text = config.get_text_config()
    if "sliding_attention" in (getattr(text, "layer_types", None) or []) or (
            getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True) is not False):
        raise UsageError(f"--fsdp does not take a model with sliding-window attention ({config.model_type}) yet: "
                         "scoring checks such a model with extra passes the other ranks cannot plan; run without "
                         "--fsdp (data parallel, or --device-map for evaluate and locate)")
    full = None
    if dist.get_rank() == 0:
        full = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    model = shard(full, config, dtype, device, trust_remote_code)
    probe(model)
    return model


def shard(full, config, dtype, device, trust_remote_code: bool = False):
    """Rank 0's whole model `full` (None on the other ranks) sharded with FSDP2 over the ranks: every decoder layer,
    and the rest (embeddings, final norm, LM head, tied or not) as the root, wrapped with fully_shard, so each rank
    holds 1/world of the weights and gathers one layer at a time. The other ranks build the model from `config` on
    the meta device and receive their shards from rank 0 (broadcast_from_rank0), as accelerate's
    cpu_ram_efficient_loading and torchtune do. In eval mode, frozen."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    from headmap.masking import decoder_layers
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval().requires_grad_(False)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=device)
    set_model_state_dict(model, full.state_dict() if full is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    kept = dict(full.named_buffers()) if full is not None else {}
    for name, buffer in model.named_buffers():  # in no state dict (rotary frequencies): rank 0's, as they are
        source = kept[name].to(device) if full is not None else buffer
        dist.broadcast(source, 0)
        buffer.copy_(source)
    return model


def shard_sizes(model) -> dict | None:
    """What FSDP holds where, read from the shards, and what the ranks' uneven shares cost: {"world",
    "full_parameter_bytes", "local_parameter_bytes": [per rank], "padding_passes": [per rank, so far]}; None for a
    model that is not sharded."""
    from headmap import distributed
    if not distributed.sharded(model):
        return None
    model.reshard()  # the root's parameters stay gathered after a forward
    local = sum(getattr(p, "to_local", lambda p=p: p)().numel() * p.element_size() for p in model.parameters())
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"world": distributed.world(), "full_parameter_bytes": full,
            "local_parameter_bytes": distributed.all_gather(local),
            "padding_passes": distributed.all_gather(distributed.padding_passes())}
