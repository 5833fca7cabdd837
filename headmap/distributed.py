"""Running under torchrun: this process's rank, its share of the rows, and the collectives locate and training use.

Without an initialised process group every function is the one-process identity: rank 0 of 1, all rows mine, sums
and gathers return their input. Joining the group is the caller's (torch.distributed.init_process_group); the rule
the library follows: every rank computes its share of the rows and takes part in every collective.
"""
import functools
from contextlib import contextmanager
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def mine(items: list) -> list:
    """This rank's share: every world()-th item from its rank on, so ranks take turns along a sorted list."""
    return items[rank()::world()]


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over ranks, on every rank (in place)."""
    if world() > 1:
        dist.all_reduce(tensor)
    return tensor


def all_gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def from_rank0(obj):
    """Rank 0's `obj` on every rank: what rank 0 read from a file, without other ranks needing the file."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sharded(model: nn.Module) -> bool:
    """Whether `model` is sharded with FSDP2 (fully_shard): then every pass of it is a collective."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def no_graph(fn):
    """Decorator for fn(model, ...), whose passes keep no graph: torch.inference_mode(), or for a sharded model
    torch.no_grad(), since FSDP gathers the shards into buffers it reuses in every later pass, and inference mode
    would make them unusable outside it (in training)."""
    @functools.wraps(fn)
    def run(model: nn.Module, *args, **kwargs):
        with torch.no_grad() if sharded(model) else torch.inference_mode():
            return fn(model, *args, **kwargs)
    return run


_padding = [0]  # the zero-weight passes same_passes has run in this process


def padding_passes() -> int:
    """How many zero-weight passes same_passes has run in this process: what the ranks' uneven shares cost."""
    return _padding[0]


@contextmanager
def same_passes(model: nn.Module, most: int, padding_pass: Callable[[torch.Tensor], None] | None = None):
    """Around a block in which the ranks run different numbers of passes of `model` (their shares of the rows), the
    busiest running `most` (which every rank must work out alike, from the plan, before any pass: a count exchanged
    afterwards would meet the other ranks' gathers): under FSDP each pass gathers every layer's shards from all
    ranks, so afterwards this rank runs zero-weight passes of one token until it has run `most`:
    padding_pass(token), which must gather what a real pass gathers (a training pass: backward too, adding zero to
    every gradient), or by default one forward without a graph. Without FSDP, nothing."""
    if not sharded(model) or world() == 1:
        yield
        return
    passes = [0]
    handle = model.register_forward_pre_hook(lambda module, args: passes.__setitem__(0, passes[0] + 1))
    try:
        yield
    finally:
        handle.remove()
    if passes[0] > most:
        raise RuntimeError(f"rank {rank()} ran {passes[0]} passes, more than the {most} planned")
    token = torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device)
    for _ in range(most - passes[0]):
        _padding[0] += 1
        if padding_pass is not None:
            padding_pass(token)
        else:
            with torch.no_grad():
                model(input_ids=token, use_cache=False)
