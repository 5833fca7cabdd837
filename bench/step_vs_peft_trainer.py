"""A training step of finetune.py against what users run instead: PEFT + Hugging Face Trainer, in one run.

    python bench/step_vs_peft_trainer.py --heads heads.json [--dataset arc_easy] [--steps 6]

The same model, the same rows (the protocol's random batches of 16), the same LoRA/DoRA settings (r 32, alpha 64,
dropout 0.05, PEFT's default targets here: LORA_TARGETS), bf16 autocast on a GPU:
- `ours`: headmap.train's batch_loss (length-sorted micro-batches within --token-budget), clipping and AdamW (fused
  on CUDA), as train_adapter runs them;
- `trainer, same batches`: PEFT's model under Trainer, sequential sampling over the same batches, each padded to
  its longest row as its collator does;
- `trainer, by length`: Trainer's group_by_length sampling (batches of similar lengths: less padding, but not the
  protocol's random batches).
Prints seconds per step (the first step of each run left out: warm-up), useful tokens per second (real tokens
predicted) and peak memory: on a GPU torch's peak allocation; on a CPU the process's peak resident set, reset
before each run through /proc/self/clear_refs (Linux). bench/gpu_scale.py runs the same functions at 7B shape.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from data.training import lm_batch, training_texts  # noqa: E402
from headmap.batching import pad_right  # noqa: E402
from headmap.adapters import LORA_TARGETS, attach_headmap, attach_lora  # noqa: E402
from headmap.train import batch_loss, checkpointed_layers, offloaded_activations  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")


def peak_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 2**20


def summary(times, tokens, losses, device) -> dict:
    """Steps after the first: mean seconds per step and useful tokens per second."""
    return {"s_per_step": sum(times[1:]) / len(times[1:]), "tokens_per_s": sum(tokens[1:]) / sum(times[1:]),
            "loss": sum(losses) / len(losses) if losses else None, "peak_gib": peak_gib(device)}


def ours(model, method, batches, pad_id, circuit=None, token_budget=4096, checkpointing=False,
         savers=False) -> dict:
    """finetune.py's step (batch_loss, clipping, AdamW) on each batch; with `checkpointing`, its layers recomputed in
    backward (--activation-checkpointing); with `savers`, also the loss in 8 slices and what backward keeps in host
    memory (--loss-chunks 8 --offload-activations)."""
    device = next(model.parameters()).device
    torch.manual_seed(0)
    adapter = (attach_headmap(model, circuit, 32, 1.0, method.split("-")[1]) if method.startswith("headmap")
               else attach_lora(model, 32, 64, 0.05, dora=method == "dora"))
    adapter.train()
    params = [p for p in adapter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=params[0].is_cuda or None)
    reset_peak(device)
    times, tokens, losses = [], [], []
    with checkpointed_layers(model, checkpointing or savers), offloaded_activations(savers):
        for batch in batches:
            start = time.perf_counter()
            losses.append(batch_loss(model, lm_batch(batch, pad_id), token_budget, backward=True,
                                     loss_chunks=8 if savers else 1))
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            times.append(time.perf_counter() - start)
            tokens.append(sum(len(s) - 1 for s in batch))
    result = summary(times, tokens, losses, device)
    adapter.remove()
    return result


def peft_trainer(model, method, batches, pad_id, grouped: bool) -> dict:
    """PEFT's LoRA/DoRA under Hugging Face Trainer over the rows of `batches`: in their order (sequential
    sampling), or grouped by length. Step time: between the ends of consecutive steps, so it holds everything the
    Trainer does per step (loading, collating, forward, backward, clipping, optimizer, schedule)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback
    device = next(model.parameters()).device
    rows = [s for batch in batches for s in batch]
    counts = []  # predicted tokens of each batch, in the order the collator builds them (the steps' order)

    def collate(features):
        seqs = [f["input_ids"] for f in features]
        ids, mask = pad_right(seqs, pad_id, "cpu")
        counts.append(sum(len(s) - 1 for s in seqs))
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"input_ids": rows[i]}

    ends = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            ends.append(time.perf_counter())

    fields = TrainingArguments.__dataclass_fields__
    if "train_sampling_strategy" in fields:  # transformers >= 5.20
        sampling = {"train_sampling_strategy": "group_by_length" if grouped else "sequential"}
    else:
        sampling = {"group_by_length": grouped}

    class SameBatches(Trainer):  # older transformers: no sequential strategy to ask for
        def _get_train_sampler(self, *args, **kwargs):
            if grouped or "train_sampling_strategy" in fields:
                return super()._get_train_sampler(*args, **kwargs)
            return torch.utils.data.SequentialSampler(self.train_dataset)

    torch.manual_seed(0)
    config = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=list(LORA_TARGETS),
                        use_dora=method == "dora", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=len(batches[0]), max_steps=len(batches),
            learning_rate=1e-4, weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="linear", warmup_steps=0,
            bf16=device.type == "cuda", use_cpu=device.type == "cpu", logging_strategy="no", save_strategy="no",
            report_to="none", disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
            seed=0, **sampling)
        trainer = SameBatches(model=peft_model, args=args, train_dataset=Rows(), data_collator=collate,
                              callbacks=[StepTimes()])
        trainer.remove_callback(PrinterCallback)  # its end-of-training summary would break this script's table
        reset_peak(device)
        sync(device)
        start = time.perf_counter()
        trainer.train()
    times = [b - a for a, b in zip([start] + ends[:-1], ends)]
    result = summary(times, counts[:len(times)], [], device)
    peft_model.unload()  # the base model back, without PEFT's layers
    return result


ROWS = [("ours", "headmap-mha", None), ("ours, checkpointed", "headmap-mha", None),
        ("ours, checkpointed, chunked, offloaded", "headmap-mha", None), ("ours", "lora", None),
        ("ours, checkpointed", "lora", None), ("ours", "dora", None),
        ("trainer, same batches", "lora", False), ("trainer, same batches", "dora", False),
        ("trainer, by length", "lora", True), ("trainer, by length", "dora", True)]


def compare(model, batches, pad_id, circuit, log=print) -> list[dict]:
    """Every row of ROWS on `batches`; HeadMap only where a circuit is given."""
    results = []
    log(f"  {'path':<24}{'method':<13}{'s/step':>8}{'tokens/s':>10}{'peak GiB':>10}")
    for path, method, grouped in ROWS:
        if method.startswith("headmap") and circuit is None:
            continue
        r = ours(model, method, batches, pad_id, circuit, checkpointing="checkpointed" in path,
                 savers="offloaded" in path) \
            if path.startswith("ours") else peft_trainer(model, method, batches, pad_id, grouped)
        results.append({"path": path, "method": method, **r})
        log(f"  {path:<24}{method:<13}{r['s_per_step']:>8.3f}{r['tokens_per_s']:>10.0f}{r['peak_gib']:>10.2f}")
    return results


if __name__ == "__main__":
    from data.scoring import pad_id_of
    from data.commonsense import default_data_dir, load_examples
    from headmap.circuit import read_circuit
    from cli.loading import DEFAULT_MODEL, load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", required=True, help="the circuit HeadMap trains on")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dataset", default="arc_easy")
    p.add_argument("--prompt", default="paper")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=default_data_dir())
    args = p.parse_args()
    model, tok = load_model(args.model, args.device)
    model.requires_grad_(False)
    examples = load_examples(args.dataset, "train", args.prompt, args.data_dir)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()  # random batches
    seqs = training_texts(tok, [examples[i] for i in order[:args.steps * args.batch_size]], 512)
    batches = [seqs[i * args.batch_size:(i + 1) * args.batch_size] for i in range(args.steps)]
    device = next(model.parameters()).device
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{args.model} on {where}; {args.dataset} {args.prompt} prompts, {args.steps} batches of {args.batch_size}, "
          f"{sum(len(s) for s in seqs) / len(seqs):.0f} tokens a row on average")
    compare(model, batches, pad_id_of(tok), read_circuit(args.heads))
