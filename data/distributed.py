"""Running under torchrun: this process's rank, its share of the rows, and the few collectives the scripts use.

    torchrun --nproc_per_node 8 locate.py --dataset boolq     # one process per GPU (NCCL), or per CPU share (gloo)

Without torchrun (no WORLD_SIZE in the environment) every function here is the one-process identity: rank 0 of
1, all rows mine, sums and gathers return their input. The rule the scripts follow: every rank computes its
share of the rows and takes part in every collective; only rank 0 reads resume files, prints, and writes.
"""
import atexit
import os
import sys
import traceback

import torch
import torch.distributed as dist


def start(device: torch.device) -> None:
    """Join the process group that torchrun describes in the environment: gloo for CPU tensors and Python
    objects, NCCL for CUDA tensors. Ranks other than 0 print nothing but a crash, which names the rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    atexit.register(dist.destroy_process_group)
    if dist.get_rank():
        rank = dist.get_rank()
        sys.stdout = sys.stderr = open(os.devnull, "w")  # progress bars, notes and warnings: rank 0 shows them

        def report_crash(kind, value, tb):
            sys.__stderr__.write(f"rank {rank} failed:\n{''.join(traceback.format_exception(kind, value, tb))}")
        sys.excepthook = report_crash


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def mine(items):
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
