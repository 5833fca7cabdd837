"""locate.py's --selector: the ways of choosing heads it compares with the paper's search, their options and checks,
the score matrix of each (headmap/selectors.py), and --compare-exact. The searches themselves (conditioned,
independent) run in locate.py, which saves their progress layer by layer."""
import argparse
import time

from .arguments import check_at_least, check_positive
from .exits import UsageError

SELECTORS = ("conditioned", "independent", "attribution", "probe", "lofit", "random")
SEARCHES = ("conditioned", "independent")  # the selectors that mask heads, layer by layer (resumable, exact)


def add_selector_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--selector", default="conditioned", choices=SELECTORS, help="how heads are chosen, n per layer: "
                   "conditioned (the paper's search, each layer scored with the circuit below masked), independent "
                   "(each head masked alone), attribution (attribution patching's first-order estimate of that, one "
                   "forward and backward), probe (ITI's linear probe per head: gold answer against a wrong one, "
                   "cross-validated accuracy; tasks with choices), lofit (LoFiT's first stage: a scaling vector "
                   "per head trained with an L1 penalty, ranked by its norm), random (the control, --seed)")
    p.add_argument("--fit-rows", type=int, help="--selector probe or lofit: fit on the first N rows of the pool "
                   "(default: all of it)")
    p.add_argument("--lofit-steps", type=int, default=100, help="--selector lofit: optimizer steps (batch 16)")
    p.add_argument("--lofit-lr", type=float, default=5e-3, help="--selector lofit: learning rate")
    p.add_argument("--lofit-l1", type=float, default=1e-3, help="--selector lofit: the L1 penalty's weight")
    p.add_argument("--compare-exact", action="store_true", help="with --selector attribution or probe: also run "
                   "independent and report the rank correlation of the scores with the exact effect of each head "
                   "masked alone, per layer and overall")


def check_selector_arguments(args: argparse.Namespace) -> None:
    """Options that cannot apply to the chosen selector, refused in one line before anything is read."""
    check_at_least(args, 4, "fit_rows")  # one example per fold of the probes' cross-validation
    check_at_least(args, 1, "lofit_steps")
    check_positive(args, "lofit_lr")
    check_at_least(args, 0, "lofit_l1")
    if args.compare_exact and args.selector not in ("attribution", "probe"):
        raise UsageError("--compare-exact compares an estimate with the exact effect of masking each head: pass "
                         "--selector attribution or probe")
    if args.fit_rows is not None and args.selector not in ("probe", "lofit"):
        raise UsageError("--fit-rows sets how many rows a probe or LoFiT's scales are fitted on: pass --selector "
                         "probe or lofit")
    if args.fsdp and args.selector == "attribution":
        raise UsageError("--selector attribution does not run under --fsdp yet; run it without --fsdp (data parallel "
                         "under torchrun, or --device-map)")


def check_selector_task(args: argparse.Namespace, task) -> None:
    """A selector that cannot serve the task, refused before its rows are read: a probe needs choices."""
    from data.common import CHOICE
    if args.selector == "probe" and task.kind != CHOICE:
        raise UsageError(f"--selector probe tells a gold answer from a wrong one, and {task.name} has one target per "
                         "row; pass another --selector (independent, attribution ...)")


def selector_settings(args: argparse.Namespace) -> dict:
    """The selector's settings a run records (and --resume checks), beside locate's own."""
    lofit = {k: getattr(args, k) for k in ("lofit_steps", "lofit_lr", "lofit_l1")} if args.selector == "lofit" else {}
    return {"selector": args.selector, "fit_rows": args.fit_rows, **lofit}


def selector_scores(model, tokenizer, samples, pool: list, args: argparse.Namespace):
    """The (layers, heads) score matrix of a selector that is not a search: attribution on D, the probes and LoFiT's
    scales on the pool's first --fit-rows rows, random draws with --seed."""
    from data.samples import probe_pairs
    from data.scoring import context_limit, pad_id_of
    from data.training import epoch_batches, training_texts
    from headmap.masking import layers_and_heads
    from headmap.selectors import attribution_scores, lofit_scores, probe_scores, random_scores
    if args.selector == "attribution":
        return attribution_scores(model, samples, args.token_budget)
    if args.selector == "probe":
        gold, wrong = probe_pairs(tokenizer, pool[:args.fit_rows], args.seed, context_limit(model))
        return probe_scores(model, gold, wrong, token_budget=args.token_budget)
    if args.selector == "lofit":  # the pool's rows as finetune trains on them (batch 16, prompt + gold answer + EOS)
        texts = training_texts(tokenizer, pool[:args.fit_rows], 512)
        batches = epoch_batches(texts, pad_id_of(tokenizer), 16, -(-args.lofit_steps * 16 // len(texts)), args.seed)
        return lofit_scores(model, batches, args.lofit_steps, args.lofit_lr, args.lofit_l1,
                            args.token_budget or 4096, args.seed, not args.no_progress)
    return random_scores(*layers_and_heads(model), args.seed)


def compare_exact(model, samples, scores: list, args) -> dict:
    """--compare-exact: the exact effect of masking each head alone (independent), and how well the estimate ranks
    the heads as it does: Spearman's rank correlation per layer and over all heads."""
    from headmap.selectors import independent_scores, rank_correlation
    started = time.time()
    exact = independent_scores(model, samples, args.token_budget, progress=not args.no_progress).tolist()
    per_layer = [rank_correlation(a, b) for a, b in zip(scores, exact)]
    overall = rank_correlation(sum(scores, []), sum(exact, []))
    print(f"{args.selector} against the exact effect (independent): rank correlation {overall:.3f} over all heads, "
          f"per layer {min(per_layer):.3f} to {max(per_layer):.3f}")
    return {"selector": "independent", "score_matrix": exact, "rank_correlation": overall,
            "rank_correlation_per_layer": per_layer, "seconds": round(time.time() - started, 1)}
