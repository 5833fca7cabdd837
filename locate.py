"""Locate a task's knowledge circuit: layer-conditioned locating (HeadMap, Algorithm 1).

    python locate.py --dataset boolq --out heads.json
    python locate.py --dataset examples/capitals              # your own rows (README: Your own task)
    torchrun --nproc_per_node 8 locate.py --dataset boolq      # each layer's candidate rows split over 8 GPUs

For each layer l in order, with the heads already chosen in the layers below masked, every head h of layer l
is masked in turn and scored by the summed loss of the gold answers of D; the n heads whose masking hurts most
join the circuit. D holds the --samples samples of the split that the unmasked model gets right (its top choice;
for a one-target task, the target reproduced greedily, every token the argmax) with the lowest loss.

The result is exact (a test compares it with one full masked forward per candidate); the speed comes from the
algorithm's structure: the layers below l are fixed while l is scored, so their output is kept and advanced one
layer at a time; the H candidates run through the layers above together, as rows of one batch with per-row
head masks (headmap/attention.py); the LM head runs only at the answer positions.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext

from cli import (DEFAULT_MODEL, HelpFormatter, UsageError, add_model_arguments, add_out_arguments, add_task_arguments,
                 check_at_least, run_script)
from data.tasks import DATASETS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_task_arguments(p, ", ".join(DATASETS), "the eight datasets' prompt style (default: paper)")
    add_model_arguments(p, DEFAULT_MODEL, "hub id, local folder or .gguf file")
    p.add_argument("--split", help="where the samples come from (default: the task's train split; a single file's "
                   "rows)")
    p.add_argument("--pool", type=int, help="draw the samples from the first N rows of the split (default: all)")
    p.add_argument("--samples", type=int, default=64, help="D: the samples each head is scored on")
    p.add_argument("--samples-from", metavar="HEADS_JSON", help="D from an earlier locate run of the same model, task, "
                   "split and pool, instead of scoring the pool again: its samples, or with a smaller --samples its "
                   "lowest-loss ones (to vary n or D)")
    p.add_argument("--heads-per-layer", type=int, help="n (default: a quarter of the heads, 8 of 32)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per scoring pass (choosing samples, validation)")
    p.add_argument("--token-budget", type=int, help="most padded tokens in one locating pass (rows x longest row): "
                   "bounds memory (default: 65536 on a GPU, 1024 on a CPU)")
    add_out_arguments(p, "the circuit file; the heat map goes beside it (.svg; plot.py draws PNG/PDF)", "heads.json",
                      overwrite_help="replace an existing --out and its heat map (--resume replaces them too: they "
                      "are the run's own)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random head sets of the validation")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from <out>.progress.json")
    p.add_argument("--no-validate", action="store_true", help="skip the accuracy check with heads masked")
    p.add_argument("--validate-split", help="default: the task's evaluation split")
    p.add_argument("--validate-limit", type=int, default=500, help="rows of the validation split (0 = all)")
    p.add_argument("--random-trials", type=int, default=5, help="random head sets the circuit is compared with")
    args = p.parse_args(argv)
    if not args.dataset:
        raise UsageError("pass --dataset: one of the eight, a file or folder of your own rows, or lm-eval:TASK")
    check_at_least(args, 1, "samples", "batch_size", "token_budget", "random_trials", "pool", "heads_per_layer")
    check_at_least(args, 0, "validate_limit")
    return args


if __name__ == "__main__":
    run_script(parse_args)  # --help and bad arguments answer at once, before torch and transformers load

import torch  # noqa: E402
import transformers  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cli import check_same_run, check_writable, load_model, open_task_for, pick_device, read_json, write_json  # noqa: E402
from data import distributed  # noqa: E402
from data.scoring import PRIMARY, encode_pair, metrics, pad_id_of, pad_right, score_continuations  # noqa: E402
from data.tasks import CHOICE  # noqa: E402
from headmap.circuit import circuit_entry, circuit_mask, random_circuit_like  # noqa: E402
from headmap.masking import UnsupportedModel, check_maskable, decoder_layers, layers_and_heads, mask_heads, probe  # noqa: E402
from plot import heat_map  # noqa: E402


def select_samples(model, tokenizer, task, examples, count, batch_size, progress=True) -> dict[str, list]:
    """The `count` examples the unmasked model answers correctly with the lowest gold loss: their indices and those
    losses (summed over the answer's tokens), in index order."""
    scores = score_continuations(model, tokenizer, examples, batch_size, progress, "choosing samples")
    correct = [i for i, right in enumerate(metrics(task.kind, examples, scores)["correct"]) if right]
    if not correct:
        raise UsageError("the unmasked model answers no example of the pool correctly; try "
                         + ("--prompt harness, " if task.prompt == "paper" else "") + "another --split or a larger --pool")
    if len(correct) < count:
        print(f"warning: only {len(correct)} correct samples (asked for {count}); using them all", file=sys.stderr)
    return lowest_loss(correct, [-scores.logprob[i][examples[i].gold] for i in correct], count)


def lowest_loss(indices: list[int], losses: list[float], count: int) -> dict[str, list]:
    """The `count` of `indices` (in index order) with the lowest losses, ties to the lower index."""
    kept = sorted(sorted(range(len(indices)), key=lambda k: losses[k])[:count])
    return {"sample_indices": [indices[k] for k in kept], "sample_losses": [losses[k] for k in kept]}


def samples_from(path: str, settings: dict, source: dict, count: int) -> dict[str, list]:
    """The samples an earlier run chose (see select_samples), if it drew them from the same rows for the same model:
    all of them, or the `count` of lowest loss (the same as scoring the pool again would choose)."""
    earlier = read_json(path, "--samples-from", "pass a heads.json written by locate.py")
    if not isinstance(earlier, dict) or not isinstance(earlier.get("sample_indices"), list):
        raise UsageError(f"--samples-from {path} records no samples; pass a heads.json written by locate.py")
    same = {**{k: settings[k] for k in ("model", "dataset", "split", "pool", "prompt")}, "data": source}
    for key, value in json.loads(json.dumps(same)).items():  # as the file holds them
        if earlier.get(key) != value:
            raise UsageError(f"--samples-from {path}: its samples were chosen with {key} {earlier.get(key)!r}, not "
                             f"{value!r}; pass a run of the same model, task, split and pool")
    held = len(earlier["sample_indices"])
    if count > held:
        raise UsageError(f"--samples-from {path} holds {held} samples; pass --samples {held} or fewer")
    if count == held:
        return {"sample_indices": earlier["sample_indices"], "sample_losses": earlier.get("sample_losses")}
    if "sample_losses" not in earlier:  # runs before 2026-11-28 recorded none
        raise UsageError(f"--samples-from {path} records no sample losses, so its {count} lowest-loss samples are "
                         f"unknown; pass --samples {held}, or drop --samples-from")
    return lowest_loss(earlier["sample_indices"], earlier["sample_losses"], count)


class Samples:
    """D as one right-padded batch, each sample's length and its gold answer tokens: where each is predicted and
    the token itself (host lists, so that batches are planned without reading the GPU)."""

    def __init__(self, tokenizer, examples, device):
        pairs = [encode_pair(tokenizer, ex.prompts[ex.gold], ex.continuations[ex.gold]) for ex in examples]
        self.ids, _ = pad_right([ctx + cont for ctx, cont in pairs], pad_id_of(tokenizer), device)
        self.lengths = [len(ctx) + len(cont) for ctx, cont in pairs]
        self.pos = [list(range(len(ctx) - 1, len(ctx) - 1 + len(cont))) for ctx, cont in pairs]
        self.targets = [cont for _, cont in pairs]


class AnswerIndex:
    """For rows that hold samples `rows` (host list), the flat answer tokens on the device: the row of each, its
    position, and the token. Built once and reused every layer, so the layer loop copies nothing to the GPU."""

    def __init__(self, samples, rows, device):
        self.n_rows = len(rows)
        self.row = torch.tensor([r for r, s in enumerate(rows) for _ in samples.targets[s]], device=device)
        self.pos = torch.tensor([p for s in rows for p in samples.pos[s]], device=device)
        self.target = torch.tensor([t for s in rows for t in samples.targets[s]], device=device)


class StandIn(torch.nn.Module):
    """Takes a decoder layer's place in the model's own forward: returns `kept`, the layer's known output, or
    with kept=None passes its input through; as a tuple padded with None where the layer returns a tuple
    (`width` entries). Other attributes (attention_type, ...) read as the layer's own."""

    def __init__(self, layer, kept, width):
        super().__init__()
        self.kept, self.width = kept, width
        self.__dict__["layer"] = layer  # not a submodule: the stand-in owns no weights

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states if self.kept is None else self.kept
        return out if self.width is None else (out,) + (None,) * (self.width - 1)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["layer"], name)


@contextmanager
def only_layers(model, first, last, kept=None):
    """Inside, the model's own forward runs decoder layers first..last-1 only: the layers below return `kept`
    (layer first-1's output on these rows), the layers from `last` on pass their input through. Every layer that
    runs gets what the model's forward gives it (masks and rotary embeddings per layer type, sliding windows),
    and the logits get every final transform the model applies (logit scaling, soft-capping)."""
    check_locatable(model)
    layers, widths = decoder_layers(model), model.__dict__["headmap_layer_widths"]
    real = list(layers)
    for i, layer in enumerate(real):
        if i < first or i >= last:
            layers[i] = StandIn(layer, kept if i < first else None, widths[i])
    try:
        yield
    finally:
        for i, layer in enumerate(real):
            layers[i] = layer


def layer_output(model, layer, run):
    """What decoder layer `layer` returns while `run()` drives the model."""
    got = []
    handle = decoder_layers(model)[layer].register_forward_hook(lambda m, a, out: got.append(out))
    try:
        run()
    finally:
        handle.remove()
    out = got[-1]
    # on the device of the model's inputs: with a device map, the layers sit on several devices
    return (out[0] if isinstance(out, tuple) else out).to(model.device)


def run_layers(model, ids, kept, first, last, mask):
    """Output of decoder layer last-1 on rows `ids`: layers first..last-1 run with heads ablated by `mask`
    (layers, rows, heads); kept is layer first-1's output on these rows (None for first = 0: the embeddings)."""
    with mask_heads(model, mask), only_layers(model, first, last, kept):  # stand-ins hide layers: mask first
        # logits_to_keep=1: the LM head runs on one position; the answers' logits come from final_logits
        return layer_output(model, last - 1, lambda: model(input_ids=ids, logits_to_keep=1))


def final_logits(model, states):
    """Logits of the model for last-layer hidden states (n, d), through the model's own forward: every decoder
    layer stands in for them, so its final norm, LM head and logit transforms run on these n positions only."""
    layers, _ = layers_and_heads(model)
    with only_layers(model, layers, layers, states[None]):
        ids = torch.zeros(1, len(states), dtype=torch.long, device=states.device)
        return model(input_ids=ids, logits_to_keep=0).logits[0].float()


def answer_loss(model, hidden, index):
    """Summed NLL of the gold answer of each row of `hidden` (last-layer states), an AnswerIndex naming the answer
    tokens: logits at the answer positions only."""
    logits = final_logits(model, hidden[index.row, index.pos])
    nll = -torch.log_softmax(logits, dim=-1).gather(1, index.target[:, None])[:, 0]
    return torch.zeros(index.n_rows, device=hidden.device).index_add_(0, index.row, nll)


def check_locatable(model) -> None:
    """Refuse, before any compute, a model whose heads cannot be masked exactly, or whose decoder layers locate
    cannot drive one by one (read from the library's probe of what each layer returns: a layer that hands more than
    the hidden state to the next cannot stand in)."""
    if "headmap_layer_widths" in model.__dict__:
        return
    check_maskable(model)
    outputs = probe(model)["layer_outputs"]
    if any(extra for _, extra, _ in outputs):
        raise UnsupportedModel(f"{type(model).__name__}: its decoder layers hand more than the hidden state to the "
                               "next layer, which locate's layer-by-layer advance cannot keep")
    shapes = {shape for _, _, shape in outputs}
    hidden = model.config.get_text_config().hidden_size
    if len(shapes) != 1 or len(min(shapes)) != 3 or min(shapes)[-1] != hidden:  # Gemma 3n's AltUp stacks 4 streams
        raise UnsupportedModel(f"{type(model).__name__}: its decoder layers pass hidden states of shape "
                               f"{sorted(shapes)} to the next, not (batch, tokens, width), which locate's "
                               "layer-by-layer advance cannot keep")
    model.__dict__["headmap_layer_widths"] = [width for width, _, _ in outputs]


def plan_batches(lengths, heads, token_budget, world=1):
    """The (candidate head, sample) rows of one layer, cut into batches: rows of the longest samples first, each
    batch at most `token_budget` padded tokens (rows x its longest row; a single row may exceed it) and cut to its
    own longest row, so no layer runs on padding beyond it (right padding and a causal mask: cutting it off changes
    nothing). Under torchrun the ranks take turns along the batches. Returns (candidates, samples, width) per batch."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows = [(h, i) for i in order for h in range(heads)]
    batches, start = [], 0
    while start < len(rows):
        width, end = lengths[rows[start][1]], start + 1  # the first row is the batch's longest
        while end < len(rows) and (end - start + 1) * width <= token_budget:
            end += 1
        batches.append(([h for h, _ in rows[start:end]], [i for _, i in rows[start:end]], width))
        start = end
    return batches + [([], [], 0)] * (-len(batches) % world)  # as many as a multiple of the ranks


def default_token_budget(device: torch.device) -> int:
    """Padded tokens in one locating pass. A GPU pass is cheap per token only when it is large (bench/gpu_scale.py);
    on a CPU, passes of 512 to 2,048 tokens ran about 20% faster than 4,096 (BENCHMARKS.md, bench/locate.py)."""
    return 65536 if device.type == "cuda" else 1024


@torch.inference_mode()
def locate(model, samples, n, token_budget, state, on_layer_done, progress=True):
    """Algorithm 1, from the layers `state` has not finished yet (it holds the circuit and loss rows so far).
    Beside the H candidates of a layer, one more runs with no head of the layer masked: the loss with only the
    circuit below masked, from which the heat map shows each head's own effect (state["circuit_below_loss"]).
    Batches of at most `token_budget` padded tokens; nothing in the layer loop waits for the GPU but the ranking
    of each layer's heads."""
    check_locatable(model)
    layers, heads = layers_and_heads(model)
    n_samples = len(samples.ids)
    device = samples.ids.device
    hidden = None  # the kept output of the layers below the current one (None: below layer 0)
    circuit = {int(k): v for k, v in state["circuit"].items()}
    done = len(state["loss_matrix"])
    state.setdefault("circuit_below_loss", [])

    def advance(hidden, layer):  # the kept input of the next layer: `layer` run once with its circuit heads masked
        mask = circuit_mask({layer: circuit[layer]}, layers, heads)[:, None].expand(layers, n_samples, heads)
        return run_layers(model, samples.ids, hidden, layer, layer + 1, mask.to(device))

    for layer in range(done):  # resume: replay the finished layers
        hidden = advance(hidden, layer)
    plan = plan_batches(samples.lengths, heads + 1, token_budget, distributed.world())  # candidate H: no head
    batches = [(b, torch.tensor(c, device=device), torch.tensor(s, device=device), width,
                AnswerIndex(samples, s, device)) for b, (c, s, width) in distributed.mine(list(enumerate(plan))) if c]
    for layer in tqdm(range(done, layers), desc="locating", initial=done, total=layers, disable=not progress):
        # one row per batch, summed over the ranks and then over the rows: the same sum in any number of processes
        loss = torch.zeros(len(plan), heads + 1, device=device)
        for b, c, s, width, index in batches:
            mask = torch.zeros(layers, len(c), heads + 1, dtype=torch.bool, device=device)
            mask[layer, torch.arange(len(c), device=device), c] = True  # row r masks its own candidate
            out = run_layers(model, samples.ids[s, :width], None if hidden is None else hidden[s, :width], layer,
                             layers, mask[..., :heads])  # column H, "no head", masks nothing
            loss[b].index_add_(0, c, answer_loss(model, out, index))
        loss = distributed.all_sum(loss).sum(0).tolist()
        order = sorted(range(heads), key=lambda h: (-loss[h], h))  # ties: the lower head index wins
        circuit[layer] = sorted(order[:n])
        state["circuit"][str(layer)] = circuit[layer]
        state["loss_matrix"].append(loss[:heads])
        state["circuit_below_loss"].append(loss[heads])
        hidden = advance(hidden, layer)
        on_layer_done(state)
    return circuit


@torch.inference_mode()
def unmasked_loss(model, samples):
    """The summed answer loss of D with no head masked: the heat map's baseline."""
    layers, heads = layers_and_heads(model)
    nothing = torch.zeros(layers, len(samples.ids), heads, dtype=torch.bool, device=samples.ids.device)
    hidden = run_layers(model, samples.ids, None, 0, layers, nothing)
    return answer_loss(model, hidden, AnswerIndex(samples, range(len(samples.ids)), hidden.device)).sum().item()


# ---------------------------------------------------------------- reporting

def print_heat_map(loss_matrix, circuit):
    shades = " .:-=+*#%@"
    print("\nloss with each head masked (per layer, darker = higher); [ ] = circuit")
    for layer, row in enumerate(loss_matrix):
        lo, hi = min(row), max(row)
        cells = []
        for h, v in enumerate(row):
            c = shades[min(9, int(10 * (v - lo) / (hi - lo))) if hi > lo else 0]
            cells.append(f"[{c}]" if h in circuit.get(layer, []) else f" {c} ")
        print(f"L{layer:<3}" + "".join(cells))


def validate(model, tokenizer, task, examples, circuit, trials, seed, batch_size, progress=True):
    """The task's metric (acc, or exact_match for one target) with no mask, with the circuit masked, and with random
    heads of the same per-layer counts."""
    layers, heads = layers_and_heads(model)

    def score(circ):
        with mask_heads(model, circuit_mask(circ, layers, heads)) if circ is not None else nullcontext():
            scores = score_continuations(model, tokenizer, examples, batch_size, progress, "validating")
        return metrics(task.kind, examples, scores)[PRIMARY[task.kind]]

    g = torch.Generator().manual_seed(seed)
    random_scores = [score(random_circuit_like(circuit, heads, g)) for _ in range(trials)]
    # the commonest answer: the gold position for multiple choice, the target text for one target
    answers = [ex.gold if task.kind == CHOICE else ex.continuations[0] for ex in examples]
    return {"rows": len(examples), "metric": PRIMARY[task.kind], "unmasked": score(None),
            "circuit_masked": score(circuit), "random_masked_mean": statistics.mean(random_scores),
            "random_masked_std": statistics.stdev(random_scores) if trials > 1 else 0.0, "random_masked": random_scores,
            # what a model that knows nothing of the task scores: guessing, or always giving the commonest answer
            "chance": statistics.mean(1 / len(ex.choices) for ex in examples) if task.kind == CHOICE else 0.0,
            "majority": max(map(answers.count, set(answers))) / len(answers)}


def knows_the_task(v: dict) -> bool:
    """Whether the unmasked accuracy is clearly (two standard errors) above both chance and the majority class:
    only then is a circuit whose masking lowers it a circuit of task knowledge."""
    floor = max(v["chance"], v["majority"])
    return v["unmasked"] > floor + 2 * math.sqrt(floor * (1 - floor) / v["rows"])


# ---------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    task = open_task_for(args.dataset, args)
    split = task.check_split(args.split or task.train_split)
    val_split = task.check_split(args.validate_split)
    svg = os.path.splitext(args.out)[0] + ".svg"
    check_writable(args.out, args.overwrite or args.resume)  # --resume: this run's own files, as finetune's
    check_writable(svg, args.overwrite or args.resume)
    progress_path = args.out + ".progress.json"
    examples = task.examples(split, args.pool)
    if args.samples > len(examples):
        more = f" or a --pool above {args.pool}" if args.pool == len(examples) else ""
        raise UsageError(f"--samples {args.samples} asks for more samples than the pool holds ({len(examples)} rows of "
                         f"{task.name} {split}); pass --samples {len(examples)} or fewer{more}")
    val_examples = None if args.no_validate else task.examples(val_split, args.validate_limit or None)
    # The rows as read now, not as the file may be when the search ends; one file is hashed once.
    source = task.source(split)
    val_source = source if val_split == split or val_examples is None else task.source(val_split)
    if val_examples is not None and split == val_split:
        print(f"note: the samples and the validation both come from {split} of {task.name}: the validation includes "
              "the samples", file=sys.stderr)
    # what decides the result; batch sizes, budgets, progress bars and devices do not (beyond float rounding)
    settings = {"model": args.model, "dataset": task.name, "split": split, "pool": args.pool,
                "prompt": task.prompt, "samples": args.samples, "samples_from": args.samples_from,
                "validate": not args.no_validate, "validate_split": args.validate_split,
                "validate_limit": args.validate_limit, "random_trials": args.random_trials, "seed": args.seed}
    earlier = samples_from(args.samples_from, settings, source, args.samples) if args.samples_from else None
    distributed.start(pick_device(args.device))
    saved = None  # the interrupted run, read and checked before the model loads
    if args.resume and distributed.rank() == 0 and os.path.exists(progress_path):
        saved = read_json(progress_path, "progress file", "delete it to start over")
        if not isinstance(saved, dict) or not {"settings", "circuit", "loss_matrix", "circuit_below_loss"} <= set(saved):
            raise UsageError(f"progress file {progress_path} is not one locate.py wrote; delete it to start over")
    saved = distributed.from_rank0(saved)  # under torchrun, only rank 0 reads and writes files
    model, tokenizer = load_model(args.model, args.device, args.dtype, args.device_map)
    layers, heads = layers_and_heads(model)
    n = args.heads_per_layer if args.heads_per_layer is not None else max(1, round(heads / 4))
    if not 1 <= n < heads:
        raise UsageError(f"--heads-per-layer must be in 1..{heads - 1} for a model with {heads} heads, got {n}")
    try:
        check_locatable(model)
    except UnsupportedModel as err:
        raise UsageError(f"cannot locate heads in {args.model}: {err}") from None

    settings["heads_per_layer"] = n
    state = {"settings": settings, "circuit": {}, "loss_matrix": [], "circuit_below_loss": [], "seconds": 0.0}
    if saved is not None:
        check_same_run(progress_path, saved["settings"], settings)
        state = saved
        done = len(state["loss_matrix"])
        print(f"resuming after layer {done - 1}" if done else "resuming with the samples chosen before")
    else:
        if args.resume:
            print(f"--resume: no {progress_path} yet; starting from the first layer")
        state.update(earlier or select_samples(model, tokenizer, task, examples, args.samples, args.batch_size,
                                               not args.no_progress))
        if distributed.rank() == 0:  # choosing them scores the whole pool: minutes on a CPU, not to be redone
            write_json(progress_path, state)
    chosen = [examples[i] for i in state["sample_indices"]]
    samples = Samples(tokenizer, chosen, next(model.parameters()).device)

    started = time.time() - state["seconds"]

    def save_progress(state):
        state["seconds"] = time.time() - started
        if distributed.rank() == 0:
            write_json(progress_path, state)

    budget = args.token_budget or default_token_budget(next(model.parameters()).device)
    circuit = locate(model, samples, n, budget, state, save_progress, not args.no_progress)
    seconds = time.time() - started
    result = {**circuit_entry(circuit), **settings, "layers": layers, "heads": heads,
              "sample_indices": state["sample_indices"], "sample_losses": state.get("sample_losses"),
              "loss_matrix": state["loss_matrix"], "circuit_below_loss": state["circuit_below_loss"],
              "unmasked_loss": unmasked_loss(model, samples),
              "kind": task.kind, "data": source,
              "seconds": round(seconds, 1),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    print_heat_map(state["loss_matrix"], circuit)
    if val_examples is not None:
        v = validate(model, tokenizer, task, val_examples, circuit, args.random_trials, args.seed, args.batch_size,
                     not args.no_progress)
        result["validation"] = {"split": val_split, "data": val_source, **v}
        commonest = "majority class" if task.kind == CHOICE else "commonest target"
        print(f"\n{v['metric']} on {v['rows']} rows of {val_split}: unmasked {v['unmasked']:.3f} "
              f"(chance {v['chance']:.3f}, {commonest} {v['majority']:.3f}), circuit masked "
              f"{v['circuit_masked']:.3f}, random heads masked {v['random_masked_mean']:.3f} "
              f"+- {v['random_masked_std']:.3f} ({args.random_trials} draws)")
        if not knows_the_task(v):
            print(f"warning: the unmasked model ({v['unmasked']:.3f}) is not clearly above chance ({v['chance']:.3f}) "
                  f"and the {commonest} ({v['majority']:.3f}), so the circuit says little about task knowledge; "
                  + ("try --prompt harness" if task.prompt == "paper" else "try a task the model can do"),
                  file=sys.stderr)
    if distributed.rank() == 0:
        write_json(args.out, result)
        heat_map(result, svg)
        if os.path.exists(progress_path):
            os.remove(progress_path)
    print(f"located {sum(map(len, circuit.values()))} heads in {seconds:.1f} s; wrote {args.out} and {svg}")
    return result


if __name__ == "__main__":
    run_script(main, resumable=True)
