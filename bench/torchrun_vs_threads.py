"""One process with T threads against torchrun with T processes of one thread, for locate.py and finetune.py,
timed in one run; the outputs must agree (the point on a small CPU is that the split is correct and measured).

    python bench/torchrun_vs_threads.py --processes 2                 # on the 2-core CPU
    python bench/torchrun_vs_threads.py --processes 8 --device cuda   # 1 GPU against 8 (threads: 1 either way)

Times are the scripts' own: locate's `seconds` (the layer loop, without loading or validation) and finetune's
seconds per optimizer step after the first (from log.jsonl), so start-up and final evaluations do not count.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
p = argparse.ArgumentParser()
p.add_argument("--processes", type=int, default=2)
p.add_argument("--device", default="cpu")
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--samples", type=int, default=8, help="locate's D")
p.add_argument("--steps", type=int, default=6, help="finetune's optimizer steps (batch 16)")
args = p.parse_args()


def run(script_args, processes):
    """Run a script alone (with --processes threads on CPU) or under torchrun (one thread each)."""
    threads = args.processes if processes == 1 and args.device == "cpu" else 1
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": str(threads)}
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    launcher = launcher if processes > 1 else []
    subprocess.run([sys.executable, *launcher, *script_args, "--device", args.device, "--model", args.model,
                    "--no-progress"], cwd=ROOT, env=env, check=True, capture_output=True, text=True)


with tempfile.TemporaryDirectory() as tmp:
    rows = {}
    for processes in (1, args.processes):
        out = f"{tmp}/heads{processes}.json"
        run(["locate.py", "--dataset", "arc_easy", "--prompt", "harness", "--pool", "200", "--samples",
             str(args.samples), "--no-validate", "--out", out], processes)
        located = json.loads(Path(out).read_text())
        folder = f"{tmp}/lora{processes}"
        run(["finetune.py", "--dataset", "arc_easy", "--method", "lora", "--dropout", "0", "--max-steps",
             str(args.steps), "--train-limit", str(16 * args.steps), "--val-limit", "16", "--eval-limit", "16",
             "--eval-every", "1000", "--out", folder], processes)
        log = [json.loads(line) for line in Path(folder, "log.jsonl").read_text().splitlines()]
        per_step = (log[-1]["seconds"] - log[0]["seconds"]) / (len(log) - 1)
        rows[processes] = (located["seconds"], per_step, located["knowledge_circuit"], [e["loss"] for e in log])

one, many = rows[1], rows[args.processes]
threads = f"{args.processes} threads" if args.device == "cpu" else "1 thread"
print(f"{args.model} on {args.device}: 1 process x {threads} against {args.processes} processes x 1 thread")
print(f"locate   ({args.samples} samples, layer loop)  : {one[0]:7.1f} s vs {many[0]:7.1f} s   "
      f"speed-up {one[0] / many[0]:.2f}x   same circuit: {one[2] == many[2]}")
print(f"finetune (LoRA, s/step, batch 16)     : {one[1]:7.2f} s vs {many[1]:7.2f} s   "
      f"speed-up {one[1] / many[1]:.2f}x   "
      f"max loss gap: {max(abs(a - b) for a, b in zip(one[3], many[3])):.1e}")
