"""Tokenisation, length-sorted batching, log-likelihood scoring of examples, and their metrics."""
import copy
import inspect
import math
import statistics
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from data.files import DataError
from data.common import CHOICE, TARGET, Example
from headmap import distributed
from headmap.masking import UnsupportedModel
from headmap.batching import length_groups, pad_right, pass_overhead_tokens


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split the way lm-evaluation-harness splits them:
    encode the whole text and take the continuation as what follows the context's own tokens, so
    the continuation is tokenised exactly as the model reads it."""
    n_space = len(context) - len(context.rstrip())
    if n_space:  # a trailing space belongs to the continuation's first token
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    context_ids = tokenizer(context).input_ids
    whole_ids = tokenizer(context + continuation).input_ids
    return context_ids, whole_ids[len(context_ids):]


@dataclass
class Prompt:
    """One context to run once, and the continuations to score after it."""
    ids: list[int]
    continuations: list[tuple[int, int, list[int]]]  # (example, choice, continuation token ids)


def context_limit(model) -> int | None:
    """The most positions `model` was trained on (its config's max_position_embeddings), None where it names none
    (or none that bounds it: XLNet's -1)."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def fit_context(ctx: list[int], cont: list[int], limit: int | None, row: int) -> tuple[list[int], int]:
    """The context cut from the left, as lm-evaluation-harness cuts it, so that context + continuation (less its last
    token, which is only predicted) takes at most `limit` positions; and how many tokens were cut. A continuation
    that alone does not fit is refused: no cut of the context could score it."""
    over = 0 if limit is None else len(ctx) + len(cont) - 1 - limit
    if over <= 0:
        return ctx, 0
    if over >= len(ctx):
        raise DataError(f"row {row + 1}: its answer of {len(cont):,} tokens does not fit the model's {limit:,} "
                        "positions; shorten it or leave the row out")
    return ctx[over:], over


def build_prompts(tokenizer, examples: list[Example], limit: int | None = None) -> tuple[list[Prompt], list[int]]:
    """One Prompt per distinct context of each example: one for most tasks, whose choices share the prompt, and
    one per choice for WinoGrande's partial scoring; each context cut to the model's `limit` positions (fit_context).
    Also returns the most tokens cut from each example's contexts (0: none)."""
    prompts, cut = [], [0] * len(examples)
    for e, ex in enumerate(examples):
        mine: dict[tuple[int, ...], Prompt] = {}
        for c, (context, continuation) in enumerate(zip(ex.prompts, ex.continuations)):
            ctx, cont = encode_pair(tokenizer, context, continuation)
            ctx, cut_here = fit_context(ctx, cont, limit, e)
            cut[e] = max(cut[e], cut_here)
            if tuple(ctx) not in mine:
                mine[tuple(ctx)] = Prompt(ctx, [])
                prompts.append(mine[tuple(ctx)])
            mine[tuple(ctx)].continuations.append((e, c, cont))
    return prompts, cut


def prompt_batches(prompts: list[Prompt], batch_size: int):
    """Prompts of the same token length together, so the prompt pass has no padding at all; longest first, so an
    out-of-memory error shows up in the first batch."""
    by_length: dict[int, list[Prompt]] = {}
    for prompt in prompts:
        by_length.setdefault(len(prompt.ids), []).append(prompt)
    for length in sorted(by_length, reverse=True):
        group = by_length[length]
        for start in range(0, len(group), batch_size):
            yield group[start:start + batch_size]


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def _cache_name(model) -> str:
    """The forward argument (and output field) that carries the key/value cache: `cache` in transformers >= 5.20,
    `past_key_values` before it."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# layer kinds whose cache a continuation pass extends exactly: keys and values (and a sparse-attention indexer's
# keys), never a recurrent state (tests/test_architectures.py checks every type against one forward per choice)
ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention", "indexed_attention"}


def continuation_groups(batch: list[Prompt], token_budget: int, device) -> list[list[int]]:
    """The passes that follow a batch's prompt pass: its multi-token continuations, as groups of rows (indices into
    the batch's (prompt, continuation) rows, in order) of similar length within `token_budget` padded tokens."""
    lengths = [len(cont) for prompt in batch for _, _, cont in prompt.continuations]
    long = [r for r, n in enumerate(lengths) if n > 1]
    return [[long[g] for g in group]
            for group in length_groups([lengths[r] - 1 for r in long], token_budget, pass_overhead_tokens(device))]


def continuation_logprobs(model, batch: list[Prompt], pad_id: int, token_budget: int) -> tuple[list[float], list[bool]]:
    """log P(continuation | prompt) for every continuation of `batch` (equal-length prompts), in order, and whether
    the continuation is the greedy one (each of its tokens the argmax after the tokens before it: lm-eval's
    is_greedy). The prompts run once; each continuation then runs against its prompt's key/value cache, so a prompt is never
    recomputed per choice. Logits come from the model's own forward (its final norm, head and any logit transform);
    the prompt pass keeps only its last position's (logits_to_keep=1). A continuation of one token needs no second
    pass: the prompt's last logits score every such choice at once. Continuations run in groups of similar length
    (length_groups, within `token_budget` padded tokens)."""
    device = next(model.parameters()).device
    rows = [(i, cont) for i, prompt in enumerate(batch) for _, _, cont in prompt.continuations]
    long = [r for r, (_, cont) in enumerate(rows) if len(cont) > 1]
    out = model(input_ids=torch.tensor([p.ids for p in batch], device=device), use_cache=bool(long), logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    scores = first[[i for i, _ in rows], [cont[0] for _, cont in rows]]
    greedy = first.argmax(-1)[[i for i, _ in rows]] == torch.tensor([cont[0] for _, cont in rows], device=device)
    name = _cache_name(model)
    # only asked for when a continuation needs it: transformers >= 5.20 warns on any lookup of past_key_values
    prompt_cache = (out[name] if name in out else out.get("past_key_values")) if long else None
    if long and prompt_cache is None:
        raise UnsupportedModel(f"{type(model).__name__} returns no key/value cache, which scoring a multi-token "
                               "answer after its prompt needs (is it a decoder?)")
    kinds = set(getattr(model.config.get_text_config(), "layer_types", None) or []) - ATTENTION_LAYERS
    recurrent = any(hasattr(layer, "recurrent_states") for layer in getattr(prompt_cache, "layers", []))
    if long and (kinds or recurrent or not hasattr(prompt_cache, "reorder_cache")):  # xLSTM's own cache class
        what = ", ".join(sorted(kinds)) or ("state-space" if recurrent else type(prompt_cache).__name__)
        raise UnsupportedModel(f"{type(model).__name__} caches a recurrent state ({what} layers), and continuing it "
                               "over a multi-token answer is not exact for every such model in transformers; score "
                               "one-token answers (--prompt paper on ARC, OpenBookQA) instead")
    windows = [layer.sliding_window for layer in getattr(prompt_cache, "layers", []) if getattr(layer, "is_sliding", 0)]
    for group in continuation_groups(batch, token_budget, device):  # rows of similar length: little padding
        cache = copy.deepcopy(prompt_cache) if len(group) < len(long) else prompt_cache
        # one copy of its prompt's cache per row; reorder_cache (beam search's) selects every state a layer keeps,
        # the recurrent state of hybrid layers too, where batch_select_indices misses some (transformers 5.24)
        cache.reorder_cache(torch.tensor([rows[r][0] for r in group], device=device))
        ids, _ = pad_right([rows[r][1][:-1] for r in group], pad_id, device)  # right padding: after every real token
        try:
            logits = model(input_ids=ids, **{name: cache}).logits
        except torch.OutOfMemoryError:
            raise
        except (AssertionError, RuntimeError) as err:  # the stock model's own limits: ProphetNet, CPM-Ant
            raise UnsupportedModel(f"{type(model).__name__} cannot continue its own key/value cache over a "
                                   f"{ids.shape[1]}-token answer ({type(err).__name__}: {err}); score one-token "
                                   "answers (--prompt paper on ARC, OpenBookQA) instead") from err
        which = [k for k, r in enumerate(group) for _ in rows[r][1][1:]]
        pos = [p for r in group for p in range(len(rows[r][1]) - 1)]
        targets = torch.tensor([t for r in group for t in rows[r][1][1:]], device=device)
        logprobs = torch.log_softmax(logits[which, pos].float(), dim=-1)
        rows_of = torch.tensor([group[k] for k in which], device=device)
        scores = scores.index_add(0, rows_of, logprobs.gather(1, targets[:, None])[:, 0])
        missed = (logprobs.argmax(-1) != targets).int()  # a token that is not the argmax: not greedy
        greedy &= torch.zeros_like(greedy, dtype=torch.int).index_add(0, rows_of, missed) == 0
    if long and windows and len(batch[0].ids) > min(windows):
        check_window_cache(model, batch, [rows[r] for r in long], scores[long])
    return scores.tolist(), greedy.tolist()


def check_window_cache(model, batch: list[Prompt], rows: list[tuple[int, list[int]]], cached: torch.Tensor):
    """A sliding-window cache keeps only the window's last keys. That is exact only if the model's own forward
    applies the same window, which Moshi's does not (and a check on one batch can pass by chance): so a batch whose
    prompts are longer than the window has its multi-token answers scored again by one full forward of prompt +
    answer, and a mismatch refuses the model. Prompts rarely outgrow real windows (4,096 tokens and up)."""
    length = len(batch[0].ids)
    ids, attention = pad_right([batch[i].ids + cont[:-1] for i, cont in rows], 0, cached.device)
    logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits.float(), dim=-1)
    full = torch.stack([logprobs[k, torch.arange(length - 1, length - 1 + len(cont)), cont].sum()
                        for k, (_, cont) in enumerate(rows)])
    tolerance = (1e-3 if model.dtype == torch.float32 else 1e-1) * full.abs().clamp(min=1.0)  # bf16: kernels differ
    if ((full - cached).abs() > tolerance).any():
        worst = (full - cached).abs().argmax()
        raise UnsupportedModel(f"{type(model).__name__}: continuing its sliding-window cache after a {length}-token "
                               f"prompt scores an answer {cached[worst]:.4f}, its full forward {full[worst]:.4f}: the "
                               "model does not apply the window its cache keeps; shorten the prompts below the window")


@dataclass
class Scores:
    """Per example and choice: the summed log-likelihood, whether the continuation is greedy, and its tokens; per
    example, the most tokens cut from the left of its contexts to fit the model (0 for almost every row)."""
    logprob: list[list[float]]
    greedy: list[list[bool]]
    tokens: list[list[int]]
    cut: list[int] | None = None


@distributed.no_graph
def score_continuations(model, tokenizer, examples: list[Example], batch_size: int = 16, progress: bool = True,
                        desc: str = "scoring", token_budget: int = 4096) -> Scores:
    """Score every choice of every example (continuation_logprobs). `batch_size` prompts run together; their
    continuations in passes of at most `token_budget` padded tokens. Under torchrun the ranks take turns along the
    batches and every rank gets all the scores; a batch is the same whichever rank runs it, so the scores equal one
    process's bit for bit."""
    limit = context_limit(model)
    prompts, cut = build_prompts(tokenizer, examples, limit)
    if any(cut):
        print(f"note: {sum(map(bool, cut))} of {len(examples)} rows are longer than the model's {limit:,} positions: "
              f"their context was cut from the left (by up to {max(cut):,} tokens), as lm-evaluation-harness cuts it",
              file=sys.stderr)
    batches = list(prompt_batches(prompts, batch_size))
    pad = pad_id_of(tokenizer)
    values = {}  # batch index -> its continuations' (log-likelihoods, greedy flags), in order
    most = 0  # a sharded model: the passes of each batch (its prompt pass and its continuation groups; it has no
    # sliding window, so the window check's extra pass never runs), planned alike on every rank, so that all run
    # as many as the busiest
    if distributed.sharded(model):
        device = next(model.parameters()).device
        passes = [1 + len(continuation_groups(batch, token_budget, device)) for batch in batches]
        most = max(sum(passes[k::distributed.world()]) for k in range(distributed.world()))
    with tqdm(total=sum(map(len, distributed.mine(batches))), desc=desc, disable=not progress, leave=False) as bar, \
            distributed.same_passes(model, most):
        for b in distributed.mine(range(len(batches))):
            values[b] = continuation_logprobs(model, batches[b], pad, token_budget)
            bar.update(len(batches[b]))
    for part in distributed.all_gather(values):  # with one process: values itself
        values.update(part)
    scores = Scores(*([[None] * len(ex.continuations) for ex in examples] for _ in range(3)), cut=cut)
    for b, batch in enumerate(batches):
        got = iter(zip(*values[b]))
        for prompt in batch:
            for e, c, cont in prompt.continuations:
                scores.logprob[e][c], scores.greedy[e][c] = next(got)
                scores.tokens[e][c] = len(cont)
    return scores


def task_metric(model, tokenizer, kind: str, examples: list[Example], batch_size: int = 16, progress: bool = True,
                desc: str = "scoring") -> float:
    """The metric a task is judged by (PRIMARY: acc, or exact_match for one target) on `examples`."""
    return metrics(kind, examples, score_continuations(model, tokenizer, examples, batch_size, progress, desc))[
        PRIMARY[kind]]


def score_examples(model, tokenizer, examples: list[Example], batch_size: int = 16, progress: bool = True,
                   desc: str = "scoring", token_budget: int = 4096) -> list[list[float]]:
    """Summed log-likelihood of every choice of every example: scores[example][choice]."""
    return score_continuations(model, tokenizer, examples, batch_size, progress, desc, token_budget).logprob


def accuracy(examples: list[Example], scores: list[list[float]]) -> dict:
    """acc: argmax of the log-likelihood; acc_norm: of the log-likelihood per character of the choice, as
    lm-evaluation-harness computes it (len of each of its choice strings; for WinoGrande's partial scoring those
    are the option-filled contexts, not the scored continuation)."""
    def argmax(xs):
        return max(range(len(xs)), key=xs.__getitem__)
    pred = [argmax(s) for s in scores]
    pred_norm = [argmax([v / max(1, len(c)) for v, c in zip(s, ex.choices)])
                 for s, ex in zip(scores, examples)]
    n = len(examples)
    return {"acc": sum(p == ex.gold for p, ex in zip(pred, examples)) / n,
            "acc_norm": sum(p == ex.gold for p, ex in zip(pred_norm, examples)) / n,
            "n": n, "predictions": pred, "predictions_norm": pred_norm,
            "correct": [p == ex.gold for p, ex in zip(pred, examples)]}


PRIMARY = {CHOICE: "acc", TARGET: "exact_match"}  # the metric a circuit's masking is judged by


def metrics(kind: str, examples: list[Example], scores: Scores) -> dict:
    """A task's metrics: acc and acc_norm for multiple choice; for one target, exact_match (the target is the
    greedy continuation, every token the argmax) and nll_per_token (the targets' summed negative log-likelihood over
    their summed tokens: longer targets weigh more). "correct" says per example whether it counts as right."""
    if kind == CHOICE:
        return accuracy(examples, scores.logprob)
    correct = [g[0] for g in scores.greedy]
    return {"exact_match": sum(correct) / len(examples),
            "nll_per_token": -sum(s[0] for s in scores.logprob) / sum(t[0] for t in scores.tokens),
            "n": len(examples), "correct": correct}


def stderr(share: float, n: int) -> float:
    """The standard error of an accuracy over n rows (lm-evaluation-harness's sample standard error)."""
    return math.sqrt(share * (1 - share) / max(1, n - 1))


def reported(kind: str, m: dict) -> dict:
    """What a results file holds of a task's metrics (m, from metrics): the primary one with its standard error,
    then acc_norm with its error (multiple choice) or nll_per_token (one target)."""
    primary, n = PRIMARY[kind], m["n"]
    other = ({"acc_norm": m["acc_norm"], "acc_norm_stderr": stderr(m["acc_norm"], n)} if kind == CHOICE
             else {"nll_per_token": m["nll_per_token"]})
    return {primary: m[primary], primary + "_stderr": stderr(m[primary], n), **other}


def baselines(kind: str, examples: list[Example]) -> dict:
    """What a model that knows nothing of the task scores on `examples`: chance (guessing among the choices; 0 for
    one target) and majority (always giving the commonest answer: the gold position, or the target text)."""
    answers = [ex.gold if kind == CHOICE else ex.continuations[0] for ex in examples]
    return {"chance": statistics.mean(1 / len(ex.choices) for ex in examples) if kind == CHOICE else 0.0,
            "majority": max(map(answers.count, set(answers))) / len(answers)}
