"""Running under torchrun: the process group joined, and --fsdp (a model larger than one GPU sharded with PyTorch's
FSDP2 over the ranks, only rank 0 reading the weights; what each rank then holds, read from the shards), with every
refusal of both: the options that cannot go with them, and the models --fsdp cannot take.

torch is imported inside the functions: --help should not wait for it.
"""
import argparse
import os
import sys

from .exits import UsageError


def check_processes(args: argparse.Namespace) -> None:
    """--fsdp needs torchrun's processes; --device-map spreads one process's model over devices, so it goes neither
    with --fsdp nor under torchrun."""
    fsdp, device_map = getattr(args, "fsdp", False), getattr(args, "device_map", None)
    if fsdp and device_map:
        raise UsageError("--fsdp shards the model over torchrun's processes and --device-map spreads it over one "
                         "process's devices; use one or the other")
    if fsdp and "WORLD_SIZE" not in os.environ:
        raise UsageError("--fsdp shards the model over torchrun's processes: run the script under torchrun "
                         "(torchrun --nproc_per_node N ... --fsdp)")
    if device_map and os.environ.get("WORLD_SIZE", "1") != "1":
        raise UsageError("--device-map spreads one model over this machine's GPUs, and torchrun starts one process "
                         "per GPU; use one or the other")


def start_distributed(device, fsdp: bool = False) -> None:
    """Under torchrun, join the process group it describes: gloo for CPU tensors and Python objects, NCCL for CUDA
    tensors. Ranks other than 0 print nothing but a crash, which names the rank (progress bars, notes and warnings:
    rank 0 shows them). Without torchrun (no WORLD_SIZE) nothing happens."""
    import atexit
    import traceback

    import torch.distributed as dist
    if (int(os.environ.get("WORLD_SIZE", "1")) == 1 and not fsdp) or dist.is_initialized():
        return  # one process (under FSDP, one rank still gathers its shards through the group)
    if device.type == "cuda":
        import torch
        torch.cuda.set_device(device)
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    atexit.register(dist.destroy_process_group)
    if dist.get_rank():
        rank = dist.get_rank()
        sys.stdout = sys.stderr = open(os.devnull, "w")

        def report_crash(kind, value, tb):
            sys.__stderr__.write(f"rank {rank} failed:\n{''.join(traceback.format_exception(kind, value, tb))}")
        sys.excepthook = report_crash


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
    the input embeddings and the LM head (each a unit of its own, so a pass gathers one of them at a time: at 70B
    each is 2 GiB; tied, they share one weight and stay in the root together), and the rest (final norm) as the
    root, wrapped with fully_shard, so each rank holds 1/world of the weights and gathers one unit at a time. The
    other ranks build the model from `config` on the meta device and receive their shards from rank 0
    (broadcast_from_rank0), as accelerate's cpu_ram_efficient_loading and torchtune do. In eval mode, frozen."""
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
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    apart = [embeddings, head] if head is not None and head.weight is not embeddings.weight else []
    for unit in [*decoder_layers(model), *apart]:
        fully_shard(unit, mesh=mesh)
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
