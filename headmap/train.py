"""The hand-written training loop: AdamW on an adapter's parameters over a frozen model, no Trainer, no PEFT.

    losses = train_adapter(model, adapter, batches, steps=600, lr=1e-3, warmup=100)

`batches` yields one dict per optimizer step in Hugging Face's convention: input_ids (rows, tokens), attention_mask
(1 = real token, right padding) and labels aligned with input_ids (-100 = not scored; the model predicts labels[t + 1]
at position t). The loss is the token mean of the batch's next-token NLL. A batch runs as length-sorted micro-batches
of at most `token_budget` padded tokens, each cut to its own longest row, and each back-propagated at once: the
gradient of one padded pass, in the memory of one micro-batch. Under torchrun (an initialised process group) each
rank runs every world()-th row by length and the gradients are summed, so every rank takes the same step.
"""
import itertools
import math
import weakref
from contextlib import contextmanager
from typing import Callable, Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from . import distributed
from .batching import length_groups, pass_overhead_tokens
from .errors import UnsupportedModel
from .masking import decoder_layers


def summed_nll(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               labels: torch.Tensor, loss_chunks: int = 1, backward_over: float | None = None) -> torch.Tensor:
    """Sum of next-token NLL over the labelled tokens of one right-padded pass (rows, tokens), a device scalar.

    With `backward_over`, sum / backward_over is back-propagated here and the sum comes back detached. With
    `loss_chunks` > 1 the model runs to its LM head's input once, and the LM head, the model's final logit
    transforms and the loss run over that many slices of the positions in turn (chunked_nll), so the whole
    (rows, tokens, vocab) logits never exist at once, in forward or backward; the same sum and gradients, to
    rounding."""
    device = next(model.parameters()).device
    # position t predicts label t+1; the last position predicts nothing. Labelling it -100 instead of slicing the
    # logits spares the backward pass a zero-filled copy of the whole [rows, length, vocab] logits tensor.
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    if loss_chunks > 1:
        nll = chunked_nll(model, input_ids, attention_mask, targets, loss_chunks)
    else:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            # no key/value cache: training needs none, and a checkpointed layer run again in backward would extend it
            logits = model(input_ids=input_ids, attention_mask=attention_mask,
                           use_cache=False).logits  # (rows, tokens, V)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
    if backward_over is None:
        return nll
    (nll / backward_over).backward()
    return nll.detach()


def final_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The logits the model's own forward makes of `hidden` (rows, tokens, hidden), the LM head's input: its LM
    head, then the final transforms causal LMs apply after it (Cohere's logit_scale, Granite's logits_scaling,
    Gemma's final_logit_softcapping). chunked_nll checks the result against the model's own logits."""
    logits = model.get_output_embeddings()(hidden)
    config = model.config.get_text_config()
    if getattr(model, "logit_scale", None) is not None:
        logits = logits * model.logit_scale
    if getattr(config, "logits_scaling", None) is not None:
        logits = logits / config.logits_scaling
    if getattr(config, "final_logit_softcapping", None) is not None:
        cap = config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits


_chunks_checked = weakref.WeakSet()  # the models whose final_logits matched their own logits once


def chunked_nll(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                targets: torch.Tensor, loss_chunks: int) -> torch.Tensor:
    """summed_nll's sum (`targets` aligned with the positions) through `loss_chunks` slices of the positions. The
    model's own forward runs with a pre-hook on its LM head that keeps the head's input (the final hidden states,
    after any scaling the model applies before its head) and hands the head only the last position, so the model's
    own logits there check final_logits (the first pass of each model; a model whose logits final_logits does not
    reproduce is refused, UnsupportedModel). With a
    graph, each slice's LM head and loss run under PyTorch's non-reentrant checkpoint: the slice's input is kept
    and its logits are made again, one slice at a time, in the one backward pass (a backward per slice would
    finish FSDP's backward before the model's). Every pass calls the LM head loss_chunks + 1 times whatever its
    length (twice more a slice in backward), so under FSDP every rank gathers it as often."""
    device = next(model.parameters()).device
    head, kept = model.get_output_embeddings(), []

    def keep_input(module, args):
        kept.append(args[0])
        return (args[0][:, -1:],) + args[1:]
    # first among the head's pre-hooks: FSDP's own would route the kept states through its backward hooks for the head
    handle = head.register_forward_pre_hook(keep_input, prepend=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    try:
        with autocast:
            own = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (rows, 1, V)
    finally:
        handle.remove()
    name = type(model).__name__
    if len(kept) != 1 or kept[0].dim() != 3 or kept[0].shape[:2] != input_ids.shape:
        raise UnsupportedModel(f"{name} does not call its LM head once on every position's hidden state, so its loss "
                               "cannot be computed in chunks; use loss_chunks=1")
    hidden = kept[0]  # (rows, tokens, hidden)
    if model not in _chunks_checked:
        with torch.no_grad():
            with autocast:
                ours = final_logits(model, hidden[:, -1:])
            gap = (ours.float() - own.float()).abs().max().item()
            bound = 8 * torch.finfo(own.dtype).eps * (1 + own.float().abs().max().item())
        if gap > bound:
            raise UnsupportedModel(f"{name} transforms its logits after its LM head in a way the chunked loss does not "
                                   f"reproduce (they differ by {gap:.3g}), so its loss cannot be computed in chunks; "
                                   "use loss_chunks=1")
        _chunks_checked.add(model)
    del own  # and its graph (the last position's logits), before any backward

    def slice_nll(part: torch.Tensor, part_targets: torch.Tensor) -> torch.Tensor:
        with autocast:
            logits = final_logits(model, part)  # (positions of the slice, V)
        return F.cross_entropy(logits.float(), part_targets, reduction="sum")
    checkpointed = torch.is_grad_enabled() and hidden.requires_grad  # keep each slice's input, not its logits
    total = torch.zeros((), device=device)
    for part, part_targets in zip(hidden.flatten(0, 1).tensor_split(loss_chunks),
                                  targets.flatten().tensor_split(loss_chunks)):
        total = total + (checkpoint(slice_nll, part, part_targets, use_reentrant=False) if checkpointed
                         else slice_nll(part, part_targets))
    return total


def batch_loss(model: nn.Module, batch: dict, token_budget: int = 4096, backward: bool = False,
               loss_chunks: int = 1) -> float:
    """Token-mean next-token NLL of `batch` (input_ids, attention_mask, labels: see the module's docstring), run as
    length-sorted micro-batches of at most `token_budget` padded tokens, each one's loss over `loss_chunks` slices
    of its positions (summed_nll). With backward=True each micro-batch's share (its summed NLL / the batch's
    labelled tokens) is back-propagated at once; without, no graph is kept. The host waits for the device once, for
    the returned number (and once to read the rows' lengths if the batch is on it)."""
    device = next(model.parameters()).device
    ids, labels, mask = batch["input_ids"], batch["labels"], batch.get("attention_mask")
    if mask is not None and bool((mask[:, 1:] > mask[:, :-1]).any()):  # micro-batches cut the padding off the right
        raise ValueError("batch_loss needs right padding (attention_mask: ones, then zeros); set the tokenizer's "
                         "padding_side = 'right'")
    lengths = (mask.sum(1) if mask is not None else torch.full((len(ids),), ids.shape[1])).tolist()
    n_tokens = int((labels[:, 1:] != -100).sum())  # every rank holds every row: no count to exchange
    by_length = sorted(range(len(ids)), key=lambda i: -lengths[i])
    rows = distributed.mine(by_length)
    overhead = pass_overhead_tokens(device)
    # under FSDP every rank plans every rank's micro-batches: all must run as many passes as the busiest
    most = max(len(length_groups([lengths[r] for r in by_length[k::distributed.world()]], token_budget, overhead))
               for k in range(distributed.world())) if distributed.sharded(model) else 0
    total = torch.zeros((), dtype=torch.float64, device=device)
    over = n_tokens if backward else None

    def padding_pass(token: torch.Tensor) -> None:  # a pass as the real ones run, with no label: it adds nothing
        summed_nll(model, token, None, torch.full_like(token, -100), loss_chunks, over)
    with torch.enable_grad() if backward else torch.no_grad(), distributed.same_passes(model, most, padding_pass):
        for group in length_groups([lengths[r] for r in rows], token_budget, overhead):
            pick = torch.tensor([rows[g] for g in group])
            width = lengths[rows[group[0]]]  # the group's longest row: beyond it, only padding
            part_ids, part_labels = (t[pick.to(t.device), :width].to(device, non_blocking=True) for t in (ids, labels))
            # no padding in this pass: no mask, so attention takes its plain causal path (decided on the host)
            uniform = all(lengths[r] == width for r in pick.tolist())
            part_mask = None if uniform or mask is None else mask[pick.to(mask.device), :width].to(device)
            total += summed_nll(model, part_ids, part_mask, part_labels, loss_chunks, over).detach()
    return distributed.all_sum(total[None]).item() / n_tokens


def all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Sum the ranks' gradients into every rank's: the gradient of the whole batch's token mean, so every rank takes
    the same optimizer step. An all-reduce rather than DistributedDataParallel: the adapter is hooks on a frozen
    model, not a module DDP wraps, and the ranks run different numbers of micro-batch backward passes per step,
    which DDP's per-backward reduction does not allow. One flat tensor: one collective per step."""
    if distributed.world() == 1:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    for p, g in zip(params, distributed.all_sum(flat).split([p.numel() for p in params])):
        p.grad = g.view_as(p)


@contextmanager
def checkpointed_layers(model: nn.Module, enabled: bool = True):
    """Within the block each decoder layer of `model` keeps only its input for backward and runs again in the
    backward pass (activation checkpointing): the activations of one layer at a time instead of all of them, for one
    more forward per step (the base is frozen: no weight gradient is recomputed). PyTorch's non-reentrant checkpoint
    through its composable, hook-based form (no layer's forward is rewritten; FSDP2's fully_shard composes with it),
    which replays the random state, so dropout draws the same masks and the results are those of the plain run."""
    if not enabled:
        yield
        return
    from torch.distributed._composable import checkpoint
    layers = decoder_layers(model)
    for layer in layers:
        if checkpoint.state(layer) is None:  # applied once per layer, then switched on and off
            checkpoint(layer)
        checkpoint.state(layer).enable_hook = True
    try:
        yield
    finally:
        for layer in layers:
            checkpoint.state(layer).enable_hook = False


@contextmanager
def offloaded_activations(enabled: bool = True):
    """Within the block what autograd keeps for backward waits in host memory (pinned, when there is a GPU) and
    comes back to the device when backward needs it: PyTorch's save_on_cpu. With checkpointed_layers that is each
    layer's input and the little outside the layers: the device then holds one layer's activations at a time, for
    a copy of each layer's input each way a step."""
    if not enabled:
        yield
        return
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        yield


def linear_schedule(steps: int, warmup: int) -> Callable[[int], float]:
    """The learning-rate factor at a step: linear warm-up over `warmup` steps, then linear decay to 0 at `steps`."""
    return lambda step: step / max(1, warmup) if step < warmup else max(0.0, (steps - step) / max(1, steps - warmup))


def optimizer_step(model: nn.Module, batch: dict, params: list[nn.Parameter], optimizer, schedule,
                   token_budget: int, max_grad_norm: float, step: int,
                   penalty: Callable[[], torch.Tensor] | None = None, loss_chunks: int = 1) -> tuple[float, float]:
    """Optimizer step `step` on `batch`: the summed gradient of its micro-batches (and of every rank's), and of
    `penalty()` where given, clipped, applied; the schedule advanced. A loss that is not finite raises
    FloatingPointError before anything changes. Returns (the batch's loss, without the penalty; gradient norm before
    clipping)."""
    loss = batch_loss(model, batch, token_budget, backward=True, loss_chunks=loss_chunks)
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step}; lower the learning rate")
    if penalty is not None and distributed.rank() == 0:  # once: the ranks' gradients are summed next
        penalty().backward()
    all_reduce_grads(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    schedule.step()
    return loss, grad_norm


def validation_loss(model: nn.Module, adapter: nn.Module, batch: dict, token_budget: int,
                    loss_chunks: int = 1) -> float:
    """The loss on `batch` with the adapter in eval mode (no dropout), back in training mode after."""
    adapter.eval()
    loss = batch_loss(model, batch, token_budget, loss_chunks=loss_chunks)
    adapter.train()
    return loss


class Trained(NamedTuple):
    """What train_adapter returns: the losses of the steps it ran, and the best adapter by validation loss."""
    losses: list[float]
    best: dict  # {"loss", "step", "state": the adapter's weights then (None: no validation yet)}


def trainable_parameters(model: nn.Module, adapter: nn.Module) -> list[nn.Parameter]:
    """The adapter's parameters that train; a model whose own tensors still require gradients is refused (their
    gradients would be computed and kept every step: a whole model's worth of memory)."""
    params = [p for p in adapter.parameters() if p.requires_grad]
    ours = {id(p) for p in adapter.parameters()}
    unfrozen = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in ours]
    if unfrozen:
        raise ValueError(f"{len(unfrozen)} of the model's own tensors require gradients ({unfrozen[0]}, ...), so every "
                         "step would compute and keep gradients for them; freeze the model first: "
                         "model.requires_grad_(False), then attach the adapter")
    if not params:
        raise ValueError("the adapter has no parameter that requires gradients: nothing to train")
    return params


def train_adapter(model: nn.Module, adapter: nn.Module, batches: Iterable[dict], steps: int, lr: float,
                  warmup: int = 0, max_grad_norm: float = 1.0, token_budget: int = 4096,
                  eval_batch: dict | None = None, eval_every: int | None = None, resume: dict | None = None,
                  on_step: Callable[[dict, Callable[[], dict]], None] | None = None, seed: int = 0,
                  progress: bool = False, activation_checkpointing: bool = False,
                  penalty: Callable[[], torch.Tensor] | None = None, loss_chunks: int = 1,
                  offload_activations: bool = False) -> Trained:
    """Train `adapter` on the frozen `model`: AdamW, linear warm-up and decay, gradient clipping.

    AdamW has no weight decay (fused on CUDA). A model whose own weights still require gradients is refused
    (ValueError): freeze it with model.requires_grad_(False) before attaching the adapter. A loss that is not finite
    raises FloatingPointError. Under torchrun, rank r > 0 draws its dropout masks from its own stream, seeded by
    (`seed`, r, the first step).

    Args:
        model: the frozen Hugging Face decoder the adapter is attached to.
        adapter: what attach_headmap, attach_lora or load_adapter returned; only its parameters train.
        batches: one batch per optimizer step, from step 0 on, in Hugging Face's convention (the module's docstring).
        steps: optimizer steps in all; lr: the peak learning rate; warmup: its linear warm-up steps.
        max_grad_norm: the gradient norm is clipped to this.
        token_budget: the most padded tokens in one micro-batch (memory).
        eval_batch: measured every `eval_every` steps and at the last (adapter in eval mode: no dropout); the
            adapter ends with the weights of the lowest loss.
        resume: a checkpoint dict (below): the steps it finished are skipped and the run continues exactly where it
            stopped (weights, optimizer, schedule, RNG, best so far).
        on_step: on_step(record, checkpoint) after each step: record {"step", "loss", "lr", "grad_norm"} (and
            "val_loss", and "best": True when it is the lowest so far); checkpoint() returns the dict {"adapter",
            "optimizer", "schedule", "rng", "step", "best"} at that step, for torch.save.
        seed: seeds the other ranks' dropout streams.
        progress: show a tqdm bar over the steps.
        activation_checkpointing: recompute each decoder layer in backward instead of keeping its activations
            (checkpointed_layers): the same losses and adapter, in far less memory, for one more forward a step.
        penalty: a term added to every step's objective (a scalar tensor of the adapter's parameters, e.g. an L1
            penalty); the losses reported are the batches' own.
        loss_chunks: compute each micro-batch's LM head and loss over this many slices of its positions, so that
            its whole logits never exist at once (summed_nll): the same losses and adapter, in less memory. A model
            whose final logits the slices do not reproduce is refused (UnsupportedModel) at the first pass.
        offload_activations: keep what backward needs in host memory, not on the device (offloaded_activations):
            with activation_checkpointing, the layers' inputs; the same losses and adapter.

    Returns:
        Trained(losses, best): the losses of the steps run here, and the best adapter by validation loss: {"loss",
        "step", "state": its weights, which the adapter ends with}.
    """
    params = trainable_parameters(model, adapter)
    # fused: one kernel for every parameter's update on CUDA, instead of a few per parameter
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=params[0].is_cuda or None)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(steps, warmup))
    step, best = 0, {"loss": math.inf, "step": 0, "state": None}
    if resume is not None:
        adapter.load_state_dict(resume["adapter"])
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        torch.set_rng_state(resume["rng"])
        step, best = resume["step"], resume.get("best", best)
    if distributed.rank():  # rank 0's stream is the one-process run's
        torch.manual_seed(hash((seed, distributed.rank(), step)))

    def checkpoint() -> dict:  # "best": {"loss", "step", "state": the best adapter's weights so far}
        return {"adapter": adapter.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "rng": torch.get_rng_state(),  # dropout resumes its masks
                "step": step, "best": best}

    losses = []
    bar = tqdm(total=steps, initial=step, desc=f"training {getattr(adapter, 'method', 'adapter')}", disable=not progress)
    with checkpointed_layers(model, activation_checkpointing), offloaded_activations(offload_activations):
        for batch in itertools.islice(batches, step, steps):
            loss, grad_norm = optimizer_step(model, batch, params, optimizer, schedule, token_budget, max_grad_norm,
                                             step + 1, penalty, loss_chunks)
            step += 1
            losses.append(loss)
            record = {"step": step, "loss": loss, "lr": schedule.get_last_lr()[0], "grad_norm": grad_norm}
            if eval_batch is not None and (step % (eval_every or steps) == 0 or step == steps):
                record["val_loss"] = validation_loss(model, adapter, eval_batch, token_budget, loss_chunks)
                if record["val_loss"] < best["loss"]:
                    record["best"] = True
                    best = {"loss": record["val_loss"], "step": step,
                            "state": {k: v.detach().clone() for k, v in adapter.state_dict().items()}}
            if on_step is not None:
                on_step(record, checkpoint)
            bar.set_postfix(loss=f"{loss:.3f}")
            bar.update(1)
    bar.close()
    if best["state"] is not None:  # no finite validation loss at all: keep the last weights
        adapter.load_state_dict(best["state"])
    return Trained(losses, best)
