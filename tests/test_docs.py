"""What a newcomer reads first runs as printed: every example command in the README and in each script's --help
parses, and every path it reads exists in the repository or is written by an earlier command of its block; the
README's install and test lines are the ones CI runs; --help says each default once; every output a script writes
has the mode a plain open() gives under the user's umask."""
import ast
import importlib
import json
import os
import re
import shlex
import stat

import pytest

from tests.conftest import ROOT, run

SCRIPTS = ("evaluate", "locate", "finetune", "merge", "plot")
READS = ("--heads", "--mask", "--adapter", "--samples-from", "--dataset", "--model")  # flags whose value is read


def commands(text: str) -> list[tuple[bool, list[str]]]:
    """The script commands of a block of shell lines (a trailing \\ joins the next line; comments dropped), as
    (under torchrun, [script, arguments...]): any line that runs one of the scripts, however it is launched
    (python X.py, torchrun ... X.py, srun torchrun ... X.py, a shell function wrapping them)."""
    found = []
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # prose with an apostrophe
            continue
        scripts = [i for i, w in enumerate(words) if w in {f"{s}.py" for s in SCRIPTS}]
        if scripts and (scripts[0] == 0 or words[0] in ("python", "python3", "torchrun", "srun") or
                        words[scripts[0] - 1] in ("python", "python3")):
            found.append((any(w in ("torchrun", "srun") for w in words[:scripts[0]]) or scripts[0] == 0,
                          words[scripts[0]:]))
    return found


def blocks() -> dict[str, list[tuple[bool, list[str]]]]:
    """README's bash blocks, each script's --help examples (its docstring), docs/*.md's bash blocks and the example
    SLURM script, by where they stand."""
    found = {}
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for k, block in enumerate(re.findall(r"```bash\n(.*?)```", page.read_text(), re.S)):
            if commands(block):
                found[f"{page.relative_to(ROOT)} bash block {k + 1}"] = commands(block)
    for script in SCRIPTS:
        found[f"{script}.py --help"] = commands(ast.get_docstring(ast.parse((ROOT / f"{script}.py").read_text())))
    sbatch = (ROOT / "examples" / "fsdp.sbatch").read_text()
    found["examples/fsdp.sbatch"] = commands(re.sub(r"^launch ", "srun torchrun ", sbatch, flags=re.M))  # its wrapper
    return found


def read_paths(script: str, args) -> list[str]:
    """What a parsed command reads from disk: its input flags' values and plot.py's input files that name paths
    (hub ids, dataset and lm-eval task names do not)."""
    values = [getattr(args, flag[2:].replace("-", "_"), None) for flag in READS]
    values += [args.circuit] if getattr(args, "circuit", None) else []
    values += getattr(args, "circuits", None) or getattr(args, "runs", None) or []
    items = [item for value in values if value for item in value.split(",")]
    return [item for item in items if item.startswith(("runs/", "examples/", "experiments/", "./", "/"))
            or item.endswith((".json", ".pt", ".gguf", ".jsonl"))]


def writes(script: str, args) -> list[str]:
    out = getattr(args, "out", None)
    return [out, os.path.splitext(out)[0] + ".svg"] if out else []


@pytest.mark.parametrize("where", sorted(blocks()))
def test_every_example_command_parses_and_reads_what_exists(where):
    """Parsed by the script's own parser; what a command reads exists or an earlier command of its block writes it
    (README and --help; docs/ and the SLURM script name the user's own files)."""
    written = []
    for _, (script, *argv) in blocks()[where]:
        module = importlib.import_module(script.removesuffix(".py"))
        args = module.build_parser().parse_args(argv)  # an unknown flag or a bad value exits here
        if where.startswith(("docs/", "examples/")):
            continue
        for path in read_paths(script, args):
            made = any(path == w or path.startswith(w.rstrip("/") + "/") for w in written)
            assert (ROOT / path).exists() or made, f"{where}: {script} reads {path}, which neither exists nor is " \
                                                   "written by an earlier command"
        written += writes(script, args)


CHECK = """
import json, os, sys
sys.path.insert(0, sys.argv[2])
from cli.exits import UsageError
import importlib
import json
failed = []
for torchrun, script, argv in json.loads(sys.argv[1]):
    os.environ.pop("WORLD_SIZE", None)
    if torchrun:
        os.environ["WORLD_SIZE"] = "8"  # as torchrun sets it
    try:
        importlib.import_module(script[:-3]).parse_args(argv)
    except (UsageError, SystemExit) as err:
        failed.append(f"{script} {' '.join(argv)}: {err}")
print(json.dumps(failed))
"""


def test_every_example_command_passes_its_scripts_own_checks(tmp_path):
    """Past argparse, each script's parse_args refuses bad combinations (--fsdp outside torchrun, a learning rate
    that is no number, a circuit HeadMap needs...): every example of every block passes them as written, run in a
    scratch folder with its --out moved there (the claim and the folder checks run, on nothing of the repository's)
    and an adapter folder standing in for each one an earlier command writes."""
    import subprocess
    import sys
    runs = []
    for where, found in sorted(blocks().items()):
        for k, (torchrun, (script, *argv)) in enumerate(found):
            if "--out" not in argv and script in ("finetune.py", "locate.py"):
                argv += ["--out", {"finetune.py": "runs/adapter", "locate.py": "heads.json"}[script]]  # the defaults
            if "--out" in argv:
                at = argv.index("--out") + 1
                argv[at] = str(tmp_path / f"{len(runs)}" / os.path.basename(argv[at].rstrip("/")))
            if "--adapter" in argv:  # an earlier command's (or the user's) adapter: a folder with its config
                adapter = tmp_path / "cwd" / argv[argv.index("--adapter") + 1]
                adapter.mkdir(parents=True, exist_ok=True)
                (adapter / "adapter_config.json").write_text("{}")
            runs.append((torchrun, script, argv))
    (tmp_path / "cwd").mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, "-c", CHECK, json.dumps(runs), str(ROOT)], cwd=tmp_path / "cwd",
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    print("\n".join(failed))
    assert failed == []
    assert len(runs) > 50 and sum(torchrun for torchrun, *_ in runs) >= 8  # torchrun and srun lines among them


def test_plots_help_examples_run_on_the_files_that_ship(tmp_path):
    """plot.py's examples read only files in the repository: they run as printed (the figure written elsewhere)."""
    examples = [command for _, command in blocks()["plot.py --help"]]
    for script, *argv in examples:
        out = argv.index("--out") + 1
        argv[out] = str(tmp_path / os.path.basename(argv[out]))
        done = run(script, *argv)
        assert done.returncode == 0, f"{script} {' '.join(argv)}: {done.stderr}"
        assert os.path.getsize(argv[out]) > 0
    assert len(examples) == 3


def test_the_blocks_hold_the_examples_they_should():
    found = blocks()
    assert len(found["README.md bash block 1"]) == 6  # the quick start
    assert any(torchrun for torchrun, _ in found["examples/fsdp.sbatch"]) and len(found["examples/fsdp.sbatch"]) == 3
    assert all(found[f"{s}.py --help"] for s in SCRIPTS)


def test_ci_runs_the_readmes_install_and_test_lines_word_for_word():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text().splitlines()
    install = re.search(r"^(pip install -r requirements\.txt.*)$", readme, re.M).group(1)
    test = re.search(r"<!-- test command -->\s*```bash\n(.*?)\n```", readme, re.S).group(1)
    assert install in ci and test in ci and test.startswith("pip install -r requirements-test.txt")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_gives_each_default_once(script):
    import subprocess
    import sys
    helps = [subprocess.run([sys.executable, f"{script}.py", *sub, "--help"], cwd=ROOT, capture_output=True,
                            text=True).stdout for sub in ([["heatmap"], ["overlap"], ["curves"]] if script == "plot"
                                                          else [[]])]
    for text in helps:
        flat = " ".join(text.split())
        assert "(default: None)" not in flat and "(default: False)" not in flat, text
        for option in re.split(r"\n  (?=-)", text):
            assert len(re.findall(r"default", " ".join(option.split()))) <= 2, option  # "default: X" said once


def test_every_output_has_the_mode_a_plain_open_gives(tiny_run, tmp_path):
    """finetune's files (adapter, records, log, checkpoint, curves), locate's circuit and heat map, evaluate's
    results, merge's checkpoint folder and plot's figure: 0666 and 0777 less the umask, never mkstemp's (or
    safetensors') 0600. With --no-progress, not one progress bar is printed on the way."""
    from headmap.files import current_umask
    model = ["--model", str(tiny_run / "model"), "--no-progress"]
    steps = [("finetune.py", "--method", "lora", "--dataset", "arc_easy", "--train-limit", "8", "--batch-size", "4",
              "--max-steps", "2", "--eval-every", "1", "--val-limit", "2", "--eval-limit", "2", "--checkpoint-every",
              "1", *model, "--out", str(tmp_path / "run")),
             ("locate.py", "--dataset", "arc_easy", "--pool", "6", "--samples", "2", "--heads-per-layer", "1",
              "--random-trials", "1", "--validate-limit", "2", *model, "--out", str(tmp_path / "heads.json")),
             ("evaluate.py", "--dataset", "arc_easy", "--limit", "2", *model, "--out", str(tmp_path / "r.json")),
             ("merge.py", "--adapter", str(tmp_path / "run"), "--out", str(tmp_path / "merged")),
             ("plot.py", "heatmap", str(tmp_path / "heads.json"), "--out", str(tmp_path / "heads.png"))]
    said = {}
    for step in steps:
        done = said[step[0]] = run(*step)
        assert done.returncode == 0, done.stderr
        if "--no-progress" in step:  # transformers' loading bar is silenced too
            assert "Loading weights" not in done.stderr and "%|" not in done.stderr, done.stderr
    assert "(1 draw: no spread to give)" in said["locate.py"].stdout  # not "± 0.000 (1 draws)"
    assert re.search(r"other metric\narc_easy .* acc_norm \d\.\d{3} ± \d\.\d{3}", said["evaluate.py"].stdout)
    files, folders = 0o666 & ~current_umask(), 0o777 & ~current_umask()
    seen = []
    for root, dirs, names in os.walk(tmp_path):
        for name in dirs + names:
            path = os.path.join(root, name)
            seen.append(os.path.relpath(path, tmp_path))
            assert stat.S_IMODE(os.stat(path).st_mode) == (folders if name in dirs else files), path
    for made in ("run/resume/checkpoint.pt", "run/adapter_model.safetensors", "run/training.json", "run/log.jsonl",
                 "run/curves.svg", "heads.json", "heads.svg", "r.json", "merged/model.safetensors",
                 "merged/merge.json", "heads.png"):
        assert made in seen, made


def test_locates_validation_bars_say_what_each_pass_scores(tiny, monkeypatch):
    import data.validation
    from data.common import CHOICE, Example
    model, tokenizer = tiny
    bars = []
    monkeypatch.setattr(data.validation, "task_metric", lambda *args: bars.append(args[-1]) or 0.5)
    task = type("Task", (), {"kind": CHOICE})()
    examples = [Example.with_choices("Q", ["a", "b"], 0)] * 4
    v = data.validation.validate_circuit(model, tokenizer, task, examples, {0: [1], 1: [2]}, trials=2, seed=0, batch_size=4)
    assert bars == ["random heads masked, 1 of 2", "random heads masked, 2 of 2", "unmasked", "circuit masked"]
    assert v["random_masked"] == [0.5, 0.5] and v["chance"] == 0.5
