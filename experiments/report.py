"""Print RESULTS.md's tables from the raw outputs in experiments/ (made by zero_shot.sh, locate.sh, finetune.sh,
locating.sh, facts.sh, selectors.sh).

    python experiments/report.py

Sections whose outputs are missing are skipped.
"""
import itertools
import json
import math
import statistics
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here.parent))
from cli import figures  # noqa: E402
from data.validation import knows_the_task  # noqa: E402
from headmap.selectors import rank_correlation  # noqa: E402
METHODS = {"headmap_mha": ("HeadMap (MHA)", "located"), "headmap_hs": ("HeadMap (HS)", "located"),
           "headmap_random": ("HeadMap (MHA)", "random"), "lora": ("LoRA", "-"), "dora": ("DoRA", "-")}


def label(name):
    """'HeadMap (MHA) located', 'LoRA': a run name as the tables and figures say it."""
    method, heads = METHODS[name]
    return method if heads == "-" else f"{method} {heads}"


def load(path):
    return json.loads(path.read_text())


def zero_shot():
    if not list(here.glob("zero_shot_*.json")):
        return
    rows = {}
    for style in ("paper", "harness"):
        for part in ("seven", "hellaswag"):
            for name, r in load(here / f"zero_shot_{style}_{part}.json")["results"].items():
                rows.setdefault(name, {})[style] = r
    print("### Zero-shot accuracy\n")
    print("| dataset | split | rows | paper acc | paper acc_norm | harness acc | harness acc_norm |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        p, h = r["paper"], r["harness"]
        print(f"| {name} | {p['split']} | {p['n']} | {p['acc']:.3f} | {p['acc_norm']:.3f} | {h['acc']:.3f} "
              f"| {h['acc_norm']:.3f} |")
    print()


def circuits():
    found = {p.stem: load(p) for p in sorted((here / "circuits").glob("*.json")) if "progress" not in p.name}
    if not found:
        return {}
    print("### Knowledge circuits: accuracy with heads masked (harness prompts)\n")
    print("| circuit | samples | heads masked | locate time | eval rows | no mask | circuit masked "
          "| random heads masked: mean ± sd (min–max), draws | circuit drop / random drop |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, c in found.items():
        v = c["validation"]
        heads = sum(len(e["retain_heads"]) for e in c["knowledge_circuit"].values())
        drop_c, drop_r = v["unmasked"] - v["circuit_masked"], v["unmasked"] - v["random_masked_mean"]
        ratio = f"{drop_c / drop_r:.1f}x" if drop_r > 0 else "n/a (random masking does not hurt)"
        print(f"| {name} | {len(c['sample_indices'])} | {heads} of {c['layers'] * c['heads']} | "
              f"{c['seconds'] / 60:.0f} min | {v['rows']} ({v['split']}) | {v['unmasked']:.3f} | "
              f"{v['circuit_masked']:.3f} | {v['random_masked_mean']:.3f} ± {v['random_masked_std']:.3f} "
              f"({min(v['random_masked']):.3f}–{max(v['random_masked']):.3f}), {len(v['random_masked'])} | {ratio} |")
    print()
    return found


def random_shared(circuit, k):
    """Heads that k random circuits with `circuit`'s per-layer counts share, on average."""
    return sum(len(e["retain_heads"]) * (len(e["retain_heads"]) / circuit["heads"]) ** (k - 1)
               for e in circuit["knowledge_circuit"].values())


def overlap(found):
    if len(found) < 2:
        return
    sets = {name: {(int(layer), h) for layer, e in c["knowledge_circuit"].items() for h in e["retain_heads"]}
            for name, c in found.items()}
    c = next(iter(found.values()))
    size = len(next(iter(sets.values())))
    print("### Shared heads between circuits\n")
    print(f"Circuits drawn at random ({size / c['layers']:.0f} of {c['heads']} heads in each of {c['layers']} layers) "
          f"share {random_shared(c, 2):.1f} heads on average when there are two of them, "
          f"{random_shared(c, len(sets)):.1f} when there are {len(sets)}.\n")
    print("| circuits | shared heads (of each circuit's heads) | Jaccard |")
    print("|---|---|---|")
    for a, b in itertools.combinations(sets, 2):
        shared = len(sets[a] & sets[b])
        print(f"| {a} ∩ {b} | {shared} of {size} | {shared / len(sets[a] | sets[b]):.2f} |")
    common = set.intersection(*sets.values())
    print(f"| all {len(sets)} | {len(common)} of {size} | {len(common) / len(set.union(*sets.values())):.2f} |")
    print(f"\nHeads in every circuit (layer.head): {', '.join(f'{l}.{h}' for l, h in sorted(common)) or 'none'}\n")


def seconds_per_step(log_path):
    """Median wall time of a training step; steps right after a validation (which includes it) are left out."""
    entries = [json.loads(line) for line in log_path.read_text().splitlines()]
    times = [b["seconds"] - a["seconds"] for a, b in zip(entries, entries[1:]) if "val_loss" not in a]
    return statistics.median(times) if times else float("nan")


def finetune():
    configs = sorted((here / "finetune").glob("*.json"))
    if not configs:
        return
    runs = []  # (dataset, run name, config, log path), in METHODS order within a dataset
    for path in configs:
        c = load(path)
        runs.append((c["dataset"], path.stem[len(c["dataset"]) + 1:], c, path.with_suffix(".log.jsonl")))
    runs.sort(key=lambda r: (r[0], list(METHODS).index(r[1])))
    # every adapter starts as the identity, so the base model's validation loss is the same for all runs of a
    # dataset; runs made before finetune.py recorded it take it from a later run
    base_loss = {d: c["val_loss_before"] for d, _, c, _ in runs if c.get("val_loss_before") is not None}
    print("### Fine-tuning (paper prompts, 20 steps at batch 16)\n")
    print("| dataset | method | heads | trainable parameters | s / step | validation loss: base → best | eval rows "
          "| accuracy before | accuracy after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dataset, run, c, log in runs:
        method, heads = METHODS[run]
        before = "-" if c["accuracy_before"] is None else f"{c['accuracy_before']:.3f}"
        base = f"{base_loss[dataset]:.3f}" if dataset in base_loss else "-"
        s = seconds_per_step(log)
        print(f"| {dataset} | {method} | {heads} | {c['trainable_parameters']:,} | {s:.1f} | "
              f"{base} → {c['best_val_loss']:.3f} | {c['eval_rows']} | {before} | {c['accuracy_after']:.3f} |")
    print()
    for dataset in sorted({d for d, _, _, _ in runs}):
        mine = [(run, log) for d, run, _, log in runs if d == dataset]
        draw_curves(mine, here / "finetune" / f"{dataset}_curves.svg", f"{dataset}, 20 steps")


def draw_curves(runs, figure, title):
    """One figure of the (run name, log path) runs: training loss (thin) and validation loss (dots)."""
    figures.curves([str(log.with_name(log.name.replace(".log.jsonl", ".json"))) for _, log in runs], str(figure),
                labels=[label(name) for name, _ in runs],
                title=f"{title}: training loss (thin) and validation loss (dots)")
    print(f"Loss curves: [{figure.relative_to(here.parent)}]({figure.relative_to(here.parent)})\n")


# decimals per measure: the validation loss's seed sd is a few 1e-4 nats, which 3 decimals would print as 0.000
DECIMALS = {"accuracy": 3, "validation loss": 4}


def mean_sd(values, decimals):
    """'mean' for one value, 'mean ± sd' (sample sd) for several."""
    mean = f"{statistics.mean(values):.{decimals}f}"
    return f"{mean} ± {statistics.stdev(values):.{decimals}f}" if len(values) > 1 else mean


def full_protocol(folder=here / "full", model=""):
    """The full-protocol runs in `folder` (full_protocol.sh's, or locating.sh's on `model`): one table per dataset,
    seeds pooled, and the loss curves."""
    runs = {}  # (dataset, prompt style, run name) -> [(config, log path)] over seeds
    for path in sorted(folder.glob("*.json")):
        c = load(path)
        name = path.stem[len(c["dataset"]) + 1:].rsplit("_s", 1)[0].removeprefix("harness_")
        runs.setdefault((c["dataset"], c["prompt"], name), []).append((c, path.with_suffix(".log.jsonl")))
    for dataset, prompt in sorted({(d, p) for d, p, _ in runs}, key=lambda dp: (dp[0], dp[1] != "paper")):
        names = [n for n in METHODS if (dataset, prompt, n) in runs]
        first = runs[dataset, prompt, names[0]][0][0]
        steps, rows = first["steps"], first["eval_rows"]
        print(f"### {model + ', ' if model else ''}{dataset}: full protocol ({steps} steps at batch 16, {prompt} prompts, "
              f"accuracy on {rows} rows of the test split)\n")
        print("| method | heads | seeds | trainable parameters | s / step | best validation loss (mean ± sd over "
              "seeds) | test accuracy (mean ± sd over seeds) | standard error of one run | accuracy before |")
        print("|---|---|---|---|---|---|---|---|---|")
        measured = {}  # run name -> {"accuracy": [per seed], "validation loss": [per seed]}
        for name in names:
            done = runs[dataset, prompt, name]
            measured[name] = {"accuracy": [c["accuracy_after"] for c, _ in done],
                              "validation loss": [c["best_val_loss"] for c, _ in done]}
            method, heads = METHODS[name]
            acc, val = (mean_sd(measured[name][k], DECIMALS[k]) for k in ("accuracy", "validation loss"))
            mean = statistics.mean(measured[name]["accuracy"])
            se = (mean * (1 - mean) / (rows - 1)) ** 0.5
            seeds = ", ".join(str(c["hyper_parameters"]["seed"]) for c, _ in done)
            s_step = statistics.mean(seconds_per_step(log) for _, log in done)
            print(f"| {method} | {heads} | {seeds} | {done[0][0]['trainable_parameters']:,} | {s_step:.1f} | "
                  f"{val} | {acc} | {se:.3f} | {done[0][0]['accuracy_before']:.3f} |")
        print()
        for a, b in (("headmap_mha", "lora"), ("headmap_mha", "dora"), ("headmap_mha", "headmap_random")):
            if a in measured and b in measured:
                parts = []
                for what, d in DECIMALS.items():
                    diff = statistics.mean(measured[a][what]) - statistics.mean(measured[b][what])
                    diff = round(diff, d) + 0.0  # + 0.0: a tie prints +0.000, not -0.000
                    sds = [statistics.stdev(measured[n][what]) for n in (a, b) if len(measured[n][what]) > 1]
                    noise = f"largest seed sd of the two {max(sds):.{d}f}" if sds else "one seed each, so no seed sd"
                    parts.append(f"{diff:+.{d}f} {what} ({noise})")
                before = runs[dataset, prompt, a][0][0]["val_loss_before"]  # the same for every run of a dataset
                drops = [before - statistics.mean(measured[n]["validation loss"]) for n in (a, b)]
                parts.append(f"{100 * drops[0] / drops[1]:.1f}% of {label(b)}'s validation-loss drop")
                losses = [measured[n]["validation loss"] for n in (a, b)]
                if min(map(len, losses)) > 1 and (max(losses[0]) < min(losses[1]) or min(losses[0]) > max(losses[1])):
                    # a permutation test on ranks: of the ways to split these runs into two groups of these sizes,
                    # two (one each way) separate them this cleanly
                    splits = math.comb(sum(map(len, losses)), len(losses[0]))
                    parts.append(f"the two sets of seeds do not overlap in validation loss (chance {2 / splits:.2f}, "
                                 "either way, were the two no different)")
                print(f"- {label(a)} minus {label(b)}: " + "; ".join(parts))
        print()
        seed0 = [(n, log) for n in names for c, log in runs[dataset, prompt, n] if c["hyper_parameters"]["seed"] == 0]
        style = "" if prompt == "paper" else f"_{prompt}"
        draw_curves(seed0, folder / f"{dataset}{style}_curves.svg",
                    f"{model + ', ' if model else ''}{dataset}, full protocol, {prompt} prompts, seed 0")


def head_set(circuit):
    return {(int(layer), h) for layer, e in circuit["knowledge_circuit"].items() for h in e["retain_heads"]}


# lm-eval's configs of these tasks report acc_norm beside acc (SIQA's, WinoGrande's and BoolQ's report acc only); it
# is their usual headline, and a model can be at chance on acc and above it on acc_norm (SmolLM2 on OpenBookQA)
ACC_NORM_TOO = {"arc_easy", "arc_challenge", "hellaswag", "openbookqa", "piqa"}


def claim_row(name, circuit, runs, metric):
    """One row of the circuit-claim table: `metric` unmasked, with the circuit masked, and with random heads masked
    (runs: evaluation results by mask name: none, circuit, random1...)."""
    none, masked = runs["none"], runs["circuit"][metric]
    randoms = [r[metric] for k, r in sorted(runs.items()) if k.startswith("random")]
    golds = [s["gold"] for s in none["samples"]]
    chance = statistics.mean(1 / len(s["scores"]) for s in none["samples"])
    majority = max(map(golds.count, set(golds))) / len(golds)
    knows = knows_the_task({"unmasked": none[metric], "chance": chance, "majority": majority, "rows": none["n"]})
    mean = statistics.mean(randoms) if randoms else float("nan")
    sd = statistics.stdev(randoms) if len(randoms) > 1 else float("nan")
    drop_c, drop_r = none[metric] - masked, none[metric] - mean
    ratio = f"{drop_c / drop_r:.1f}x" if drop_r > 0 else "n/a"
    below = f"{(mean - masked) / sd:.1f}" if sd > 0 else "n/a"
    spread = f"{mean:.3f} ± {sd:.3f} ({min(randoms):.3f}–{max(randoms):.3f}), {len(randoms)}" if randoms else "–"
    return (f"| {name}{'' if knows else ' (not above chance/majority)'} | {metric} | {len(head_set(circuit))} of "
            f"{circuit['layers'] * circuit['heads']} | {none['n']} | {chance:.3f} | {majority:.3f} | {none[metric]:.3f} | "
            f"{masked:.3f} | {spread} | {ratio} | {below} | {circuit['seconds'] / 60:.0f} min |")


def wall_times(log_path, model):
    """Rows of the wall-time table of `model`'s steps in locating.sh's steps.log: per circuit, its locate step and
    its evaluations' median (min–max) in minutes, in the order they first ran. A step resumed across sessions logs
    its last part only."""
    locate, evals = {}, {}
    for line in log_path.read_text().splitlines():
        _, seconds, kind, step_model, _, name, *_ = line.split(" ")
        if step_model == model and kind in ("locate", "eval"):
            minutes = int(seconds.removesuffix("s")) / 60
            if kind == "locate":
                locate[name] = minutes
            else:
                evals.setdefault(name, []).append(minutes)
    rows = []
    for name in dict.fromkeys([*locate, *evals]):
        e = sorted(evals.get(name, []))
        spread = f"{statistics.median(e):.1f} ({e[0]:.1f}–{e[-1]:.1f}), {len(e)}" if e else "–"
        rows.append(f"| {name} | {f'{locate[name]:.0f}' if name in locate else '–'} | {spread} |")
    return rows


def is_ablation(name, circuit):
    """Whether circuit `name` is an ablation of its dataset's main circuit (piqa_d8, boolq_n1; not piqa or boolq)."""
    return "_" in name.replace(circuit["dataset"], "")


def ablation_rows(folder, circuits):
    """Rows of the ablation table of one model's `folder` (circuits: by name, e.g. piqa, piqa_d8, piqa_n1): each
    ablation and its dataset's main circuit, in the order of (dataset, n, D); the heads each shares with the main
    circuit, the accuracy unmasked, with it masked and with random heads of its per-layer counts masked."""
    ablations = [(n, c) for n, c in circuits.items() if is_ablation(n, c)]
    if not ablations:
        return []
    ablations += [(c["dataset"], circuits[c["dataset"]]) for _, c in ablations if c["dataset"] in circuits]
    ablations = sorted(dict(ablations).items(), key=lambda nc: (nc[1]["dataset"], nc[1]["heads_per_layer"],
                                                                nc[1]["samples"]))
    rows = []
    for name, c in ablations:
        base = circuits.get(c["dataset"])
        if name == c["dataset"]:
            shared = "(the main circuit)"
        elif base:
            # a random circuit of c's per-layer counts shares |c_l| |main_l| / heads of each layer's heads
            by_chance = sum(len(e["retain_heads"]) * len(base["knowledge_circuit"][layer]["retain_heads"])
                            for layer, e in c["knowledge_circuit"].items()) / c["heads"]
            shared = f"{len(head_set(c) & head_set(base))} ({by_chance:.1f})"
        else:
            shared = "–"
        acc = {what: f"{load(path)['results'][c['dataset']]['acc']:.3f}" if path.exists() else "–"
               for what, path in (("none", folder / f"{c['dataset']}.none.json"),
                                  ("circuit", folder / f"{name}.circuit.json"))}
        randoms = [load(path)["results"][c["dataset"]]["acc"] for path in sorted(folder.glob(f"{name}.random*.json"))]
        # a D ablation keeps the main circuit's per-layer counts, so the main circuit's draws are its own
        same_counts = base is not None and c["heads_per_layer"] == base["heads_per_layer"]
        spread = f"{mean_sd(randoms, 3)}, {len(randoms)}" if randoms else "the main circuit's" if same_counts else "–"
        rows.append(f"| {name} | {c['heads_per_layer']} | {c['samples']} | {len(head_set(c))} | {shared} | "
                    f"{acc['none']} | {acc['circuit']} | {spread} |")
    return rows


def locating():
    """Section 6: the circuit claim per model and dataset, how the circuits overlap, the ablations of n and D and the
    fine-tuning runs (experiments/locating.sh)."""
    for folder in sorted(p for p in (here / "locating").glob("*") if p.is_dir()):
        circuits = {p.stem: load(p) for p in sorted(folder.glob("*.json")) if p.stem.count(".") == 0}
        if not circuits:
            continue
        model = next(iter(circuits.values()))["model"]
        print(f"### {folder.name} ({model}): the circuit against random heads of the same per-layer counts\n")
        print("| dataset | metric | heads masked | eval rows | chance | majority | no mask | circuit masked | random "
              "masked: mean ± sd (min–max), draws | drop ratio | circuit below random by (random sds) | locate time |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        main = {}
        for name, c in circuits.items():
            runs = {p.name.split(".")[1]: load(p)["results"][c["dataset"]] for p in folder.glob(f"{name}.*.json")}
            if is_ablation(name, c) or not {"none", "circuit"} <= set(runs):
                continue  # an ablation, or not validated yet
            main[name] = c
            for metric in ("acc", "acc_norm") if c["dataset"] in ACC_NORM_TOO else ("acc",):
                print(claim_row(name, c, runs, metric))
        print()
        if len(main) > 1:
            names = list(main)
            _, jaccard, counts, _ = figures.overlap_data(list(main.values()), names)
            figures.overlap(list(main.values()), str(folder / "overlap.svg"), names)
            print(f"Shared heads (Jaccard index; figure: [overlap.svg]({(folder / 'overlap.svg').relative_to(here.parent)}))\n")
            print("| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
            for a, row in zip(names, jaccard):
                print(f"| {a} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
            c = next(iter(main.values()))  # every main circuit keeps the same number of heads per layer
            shared, size = random_shared(c, 2), len(head_set(c))
            print(f"\nTwo random circuits of these per-layer counts share {shared:.1f} of {size} heads on average "
                  f"(Jaccard about {shared / (2 * size - shared):.2f}).")
            print("\nHeads held by two or more circuits, per layer: " +
                  ", ".join(f"L{layer}: {sum(k > 1 for k in row)}" for layer, row in enumerate(counts)) + "\n")
        rows = ablation_rows(folder, circuits)
        if rows:
            print(f"Ablations of the locating ({folder.name}): heads shared with the main circuit (D = 64, the default "
                  "n), and the accuracy with each circuit masked\n")
            print("| circuit | n | D | heads | shared with the main circuit (by chance) | no mask | circuit masked | "
                  "random heads of its per-layer counts masked: mean ± sd, draws |")
            print("|---|---|---|---|---|---|---|---|")
            print("\n".join(rows) + "\n")
        log = here / "locating" / "steps.log"
        if log.exists():
            print(f"Wall times of {folder.name}'s steps (steps.log; minutes on one of the 2 cores)\n")
            print("| circuit | locate step | evaluations: median (min–max), count |\n|---|---|---|")
            print("\n".join(wall_times(log, folder.name)) + "\n")
        if (folder / "finetune").is_dir():  # fine-tuning on this model: HeadMap on its circuit, on random heads, LoRA
            full_protocol(folder / "finetune", folder.name)


def facts():
    """Section 7: README's worked example, your own task (experiments/facts.sh): the circuit of a one-target task
    and the methods fine-tuned on it."""
    folder = here / "facts"
    if not (folder / "recall.none.json").exists():
        return
    results = {p.name[:-len(".json")]: load(p) for p in folder.glob("*.*.json") if not p.name.endswith("training.json")}

    def result(name):
        return next(iter(results[name]["results"].values())) if name in results else None

    base = result("recall.none")
    print("### Your own task: the circuit of factual recall (exact match and NLL per target token, 90 test rows)\n")
    print("| circuit | heads masked | exact match: no mask | circuit masked | random masked: mean ± sd, draws "
          "| NLL/token: no mask | circuit masked | random masked: mean ± sd, draws | locate time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ("recall", "recall_n1"):
        if not (folder / f"{name}.json").exists():
            continue
        c, v = load(folder / f"{name}.json"), load(folder / f"{name}.json")["validation"]
        masked = result(f"{name}.circuit")
        nll = [result(f"{name}.random{k}")["nll_per_token"] for k in range(1, 6) if result(f"{name}.random{k}")]
        nll_masked = f"{masked['nll_per_token']:.3f}" if masked else "–"
        print(f"| {name} (n = {c['heads_per_layer']}, D = {len(c['sample_indices'])}) | {len(head_set(c))} of "
              f"{c['layers'] * c['heads']} | {v['unmasked']:.3f} | {v['circuit_masked']:.3f} | "
              f"{v['random_masked_mean']:.3f} ± {v['random_masked_std']:.3f}, {len(v['random_masked'])} | "
              f"{base['nll_per_token']:.3f} | {nll_masked} | {mean_sd(nll, 3) if nll else '–'}, {len(nll)} | "
              f"{c['seconds'] / 60:.0f} min |")
    print()
    runs = {m: load(folder / f"{m}.training.json") for m in ("headmap", "headmap_random", "lora")
            if (folder / f"{m}.training.json").exists()}
    if not runs:
        return
    choice = result("choice.none")
    print("### Your own task: fine-tuned on the 190 training facts (4 epochs, 48 steps)\n")
    print("| method | trainable parameters | validation loss: before → best | exact match (test): before → after "
          "| NLL/token after | 4-way choice acc (test): before → after |")
    print("|---|---|---|---|---|---|")
    for method, r in runs.items():
        recall, picked = result(f"recall.{method}"), result(f"choice.{method}")
        if not (recall and picked and choice):
            continue  # not evaluated yet
        print(f"| {label({'headmap': 'headmap_mha'}.get(method, method))} | {r['trainable_parameters']:,} | "
              f"{r['val_loss_before']:.3f} → {r['best_val_loss']:.3f} | {r['accuracy_before']:.3f} → "
              f"{r['accuracy_after']:.3f} | {recall['nll_per_token']:.3f} | {choice['acc']:.3f} → {picked['acc']:.3f} |")
    print()


# ---------------------------------------------------------------- section 8: which heads? (selectors.sh)

# per task: where section 6 or 7 keeps its circuit and evaluations, and the metric masking is measured by (facts:
# the targets' NLL per token, since any 60 heads take exact match to about 0 there: section 7)
SELECTOR_TASKS = {"arc_easy": ("locating/smollm2", "arc_easy", "acc"), "piqa": ("locating/smollm2", "piqa", "acc"),
                  "hellaswag": ("locating/smollm2", "hellaswag", "acc"), "facts": ("facts", "recall", "nll_per_token")}
SELECTOR_NAMES = ("conditioned", "independent", "attribution", "probe", "lofit", "random")


def selector_files(task):
    """{selector: (circuit, evaluation with its heads masked)} of a task, and the unmasked and random-head
    evaluations (section 6's or 7's, shared by every selector: the same D, the same n per layer)."""
    folder, name, _ = SELECTOR_TASKS[task]
    base = here / folder

    def results(path):
        return load(path)["results"][next(iter(load(path)["results"]))] if path.exists() else None
    found = {"conditioned": (load(base / f"{name}.json"), results(base / f"{name}.circuit.json"))}
    for selector in SELECTOR_NAMES[1:]:
        circuit = here / "selectors" / f"{task}.{selector}.json"
        if circuit.exists():
            found[selector] = (load(circuit), results(circuit.with_suffix(".circuit.json")))
        overall = here / "selectors" / f"{task}.{selector}.global.json"  # ITI's and LoFiT's own pick over all layers
        if overall.exists():
            found[f"{selector}, global top-K"] = (load(overall), results(overall.with_suffix(".circuit.json")))
    randoms = [results(p) for p in sorted(base.glob(f"{name}.random*.json"))]
    return found, results(base / f"{name}.none.json"), randoms


def paired_se(none, masked):
    """The standard error of the accuracy drop none - masked over the same rows (paired, from their samples)."""
    def right(sample):  # evaluate.py before 2026-12 recorded the choice made, not whether it was right
        return float(sample["correct"] if "correct" in sample else sample["pred"] == sample["gold"])
    diffs = [right(a) - right(b) for a, b in zip(none["samples"], masked["samples"])]
    return statistics.stdev(diffs) / math.sqrt(len(diffs))


def selectors():
    if not (here / "selectors").is_dir():
        return
    print("### Which heads: each selector's heads masked, against random heads of the same per-layer counts\n")
    print("SmolLM2-135M-Instruct, harness prompts (facts: your own task's recall rows, the targets' NLL per token, "
          "whose rise stands for the drop; its error from the random draws alone), the same D = 64 "
          "and n = 2 of 9 heads per layer for every selector. Drop ratio = (no mask - its heads masked) / (no mask - "
          "random heads masked), ± its standard error (the paired error of its drop and the error of the random "
          "mean, propagated). Rank correlation: Spearman's, of the selector's scores with the exact effect of each "
          "head masked alone (independent), over all 270 heads / the mean of the 30 layers' (a search's losses grow "
          "with depth, so only the second compares it). Selection times ran beside other work (section 6's searches "
          "two at a time): bench/selectors_speed.py has them measured alone.\n")
    print("| task | selector | layer-conditioned | selection time | rows | no mask | its heads masked | random heads "
          "masked: mean ± sd, draws | drop ratio | rank correlation with independent: all heads / per layer |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ratios = {}
    for task, (_, _, metric) in SELECTOR_TASKS.items():
        found, none, randoms = selector_files(task)
        exact = found.get("independent", (None,))[0]
        rand = [r[metric] for r in randoms if r]
        for selector, (circuit, masked) in found.items():
            if masked is None or none is None or not rand:
                continue
            mean, sd = statistics.mean(rand), statistics.stdev(rand) if len(rand) > 1 else 0.0
            sign = -1 if metric == "nll_per_token" else 1  # a loss rises where an accuracy drops
            drop, drop_r = sign * (none[metric] - masked[metric]), sign * (none[metric] - mean)
            paired = paired_se(none, masked) if metric != "nll_per_token" else 0.0  # per-row NLL is not recorded
            se = abs(drop / drop_r) * math.sqrt((paired / drop) ** 2 + (sd / math.sqrt(len(rand)) / drop_r) ** 2) \
                if drop and drop_r else 0
            ratios.setdefault(task, {})[selector] = (drop / drop_r if drop_r > 0 else float("nan"), se)
            scores = circuit.get("score_matrix") or circuit["loss_matrix"]
            rho = "–"
            if exact and selector in SELECTOR_NAMES and selector not in ("independent", "random"):
                per_layer = [rank_correlation(a, b) for a, b in zip(scores, exact["score_matrix"])]
                rho = (f"{rank_correlation(sum(scores, []), sum(exact['score_matrix'], [])):.2f} / "
                       f"{statistics.mean(per_layer):.2f}")
            conditioned = circuit.get("layer_conditioned", selector == "conditioned")
            print(f"| {task} | {selector} | {'yes' if conditioned else 'no'} | {circuit['seconds']:.0f} s | "
                  f"{none['n']} | {none[metric]:.3f} | {masked[metric]:.3f} | {mean:.3f} ± {sd:.3f}, {len(rand)} | "
                  f"{ratios[task][selector][0]:.2f} ± {se:.2f} | {rho} |")
    print()
    if ratios:
        selector_figures(ratios)
    selector_finetuning()


def selector_figures(ratios):
    """Two figures beside the raw outputs: the drop ratios side by side, and attribution's estimate against the
    exact effect of each head masked alone (one point per head) where both were run."""
    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    tasks = list(ratios)
    for i, selector in enumerate(SELECTOR_NAMES):
        xs = [t + (i - 2.5) * 0.14 for t in range(len(tasks))]
        got = [ratios[task].get(selector, (float("nan"), 0)) for task in tasks]
        ax.bar(xs, [r for r, _ in got], 0.14, yerr=[e for _, e in got], label=selector, capsize=2)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("drop ratio (1 = as random)")
    ax.legend(fontsize=7, ncol=6)
    figures.save(str(here / "selectors" / "drop_ratios.svg"), fig)
    pairs = [(task, load(here / "selectors" / f"{task}.attribution.json"), load(here / "selectors" /
              f"{task}.independent.json")) for task in tasks if (here / "selectors" / f"{task}.attribution.json").exists()
             and (here / "selectors" / f"{task}.independent.json").exists()]
    if not pairs:
        return
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.2 * len(pairs), 3.2), squeeze=False)
    for ax, (task, estimate, exact) in zip(axes[0], pairs):
        unmasked = exact["unmasked_loss"]
        ax.scatter([v - unmasked for v in sum(exact["score_matrix"], [])], sum(estimate["score_matrix"], []), s=5)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("exact: loss increase, head masked alone")
    axes[0][0].set_ylabel("attribution's estimate")
    print("Figures: [drop_ratios.svg](experiments/selectors/drop_ratios.svg), "
          "[attribution_vs_exact.svg](experiments/selectors/attribution_vs_exact.svg)\n")
    figures.save(str(here / "selectors" / "attribution_vs_exact.svg"), fig)


def selector_finetuning():
    runs = {}  # task -> method -> seed -> training.json
    for path in sorted((here / "selectors" / "finetune").glob("*_s[0-9].json")):
        task, method, seed = path.stem.rsplit("_", 2)  # <task>_<method>_s<seed>; a task name may hold "_"
        runs.setdefault(task, {}).setdefault(method, {})[seed] = load(path)
    if not runs:
        return
    order = ["conditioned", "independent", "attribution", "probe", "lofit", "random", "lora"]
    print("### Which heads: HeadMap fine-tuned on each selector's heads (40 steps at batch 16, seeds 0-2 where "
          "run)\n")
    print("| task | heads from | seeds | accuracy before (no adapter) | accuracy after: mean ± se | after - random "
          "heads', paired by seed: mean ± se | validation loss before (mean: facts holds out rows by seed) | best "
          "validation loss: mean ± se |")
    print("|---|---|---|---|---|---|---|---|")

    def mean_se(values: list) -> str:
        se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
        return f"{statistics.mean(values):.3f} ± {se:.3f}"
    for task, methods in runs.items():
        random_heads = methods.get("random", {})
        for method, by_seed in sorted(methods.items(), key=lambda kv: order.index(kv[0])):
            rs = list(by_seed.values())
            paired = [r["accuracy_after"] - random_heads[seed]["accuracy_after"] for seed, r in by_seed.items()
                      if seed in random_heads]
            print(f"| {task} | {'LoRA (reference)' if method == 'lora' else method} | {len(rs)} | "
                  f"{rs[0]['accuracy_before']:.3f} | {mean_se([r['accuracy_after'] for r in rs])} | "
                  f"{mean_se(paired) if paired and method != 'random' else '–'} | "
                  f"{statistics.mean(r['val_loss_before'] for r in rs):.3f} | "
                  f"{mean_se([r['best_val_loss'] for r in rs])} |")
    print()


if __name__ == "__main__":
    zero_shot()
    overlap(circuits())
    finetune()
    full_protocol()
    locating()
    facts()
    selectors()
