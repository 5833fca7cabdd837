"""headmap/ is a library: copied alone under another name it works in a fresh interpreter, and it sits beside Hugging
Face's `kernels` package (whose import name the library's old folder took) without either breaking the other."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run


def snippet(path: str, marker: str) -> str:
    """The python block after `<!-- marker -->` in a markdown file of the repository."""
    text = (ROOT / path).read_text()
    return re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", text, re.S).group(1)


def clean_env(**extra):
    """No TRITON_INTERPRET (the production CPU path), no PYTHONPATH (nothing of this repository on the path)."""
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")} | extra


def test_the_library_copied_under_another_name_runs_the_readme_example(tmp_path):
    shutil.copytree(ROOT / "headmap", tmp_path / "vendor" / "hm_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "example.py").write_text(snippet("docs/library.md", "library example"))
    check = "import sys; assert not any(p.startswith(%r) for p in sys.path if p), sys.path\n" % str(ROOT)
    (tmp_path / "sitecheck.py").write_text(check)
    for script in ("sitecheck.py", "example.py"):  # -E: no PYTHONPATH; -s: no user site; cwd: the other project
        done = subprocess.run([sys.executable, "-E", "-s", script], cwd=tmp_path, capture_output=True, text=True,
                              env=clean_env(), timeout=600)
        assert done.returncode == 0, done.stderr
    assert "masked, trained, saved, loaded and merged" in done.stdout
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors",
                                                        "headmap.json"]  # PEFT's two files, and HeadMap's own
    for path in (tmp_path / "vendor" / "hm_kernels").glob("*.py"):  # relative imports only, no script code
        source = path.read_text()
        assert not re.search(r"^\s*(from|import) (headmap|cli|runs|models|data|kernels)\b", source, re.M), path.name
        assert "argparse" not in source and "UsageError" not in source, path.name


def test_the_readmes_python_example_locates_trains_and_saves_with_the_library_alone(tiny_run, tmp_path):
    """README's "Use it from Python", verbatim, with headmap/ pasted alone under another name and the hub id a local
    folder (a 2-layer random LLaMA with SmolLM2's tokenizer): it locates, trains and saves; the lines appended after
    it check what it made."""
    shutil.copytree(ROOT / "headmap", tmp_path / "vendor" / "hm_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(tiny_run / "model", tmp_path / "HuggingFaceTB" / "SmolLM2-135M-Instruct")
    checks = """
assert sorted(circuit) == [0, 1] and all(len(h) == 2 for h in circuit.values()), circuit
assert loss_matrix.shape == (2, 4) and bool((loss_matrix > 0).all())
assert len(losses) == 20 and losses[-1] < losses[0], losses
import sys
assert not {"cli", "data"} & set(sys.modules) and "headmap" not in sys.modules
print("located, trained and saved")
"""
    (tmp_path / "example.py").write_text(snippet("README.md", "python example") + checks)
    done = subprocess.run([sys.executable, "-E", "-s", "example.py"], cwd=tmp_path, capture_output=True, text=True,
                          env=clean_env(HF_HUB_OFFLINE="1"), timeout=600)
    assert done.returncode == 0, done.stderr
    assert "located, trained and saved" in done.stdout
    assert "circuit: 4 heads in 2 layers" in done.stdout  # what it did, said as it runs
    assert re.search(r"training loss \d+\.\d{3} -> \d+\.\d{3}", done.stdout), done.stdout
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors",
                                                        "headmap.json"]  # PEFT's two files, and HeadMap's own


def test_every_script_runs_with_hugging_faces_kernels_package_installed(tiny_run, tmp_path):
    """transformers (5.25 on) depends on `kernels` and kernelizes every model it loads; from the repository's root it
    must find that package, not a folder of ours, and every script must run through it."""
    pytest.importorskip("kernels", reason="transformers before 5.25 does not install Hugging Face's kernels")
    seen = subprocess.run([sys.executable, "-c", "from transformers.utils import is_kernels_available as a; "
                           "import kernels; print(a(), kernels.__file__)"],
                          cwd=ROOT, capture_output=True, text=True, env=clean_env(), timeout=300)
    assert seen.returncode == 0, seen.stderr
    available, where = seen.stdout.split()
    assert available == "True" and not where.startswith(str(ROOT)), seen.stdout
    model, heads, adapter = str(tiny_run / "model"), str(tmp_path / "heads.json"), str(tmp_path / "adapter")
    quiet = ["--no-progress"]
    for script in (["locate.py", "--model", model, "--dataset", "arc_easy", "--prompt", "harness", "--pool", "16",
                    "--samples", "2", "--validate-limit", "4", "--random-trials", "1", "--out", heads, *quiet],
                   ["finetune.py", "--heads", heads, "--train-limit", "8", "--max-steps", "1", "--val-limit", "2",
                    "--eval-limit", "2", "--out", adapter, *quiet],
                   ["evaluate.py", "--dataset", "arc_easy", "--limit", "2", "--adapter", adapter, *quiet],
                   ["merge.py", "--adapter", adapter, "--out", str(tmp_path / "merged")],
                   ["plot.py", "heatmap", heads, "--out", str(tmp_path / "heads.png")]):
        done = run(*script)
        assert done.returncode == 0, f"{script[0]}: {done.stderr}"
    assert (tmp_path / "merged" / "model.safetensors").exists() and (tmp_path / "heads.png").exists()


def test_data_imports_nothing_of_the_scripts_and_raises_its_own_value_error():
    from data.files import DataError
    from data.tasks import open_task
    for path in (ROOT / "data").glob("*.py"):
        assert not re.search(r"^\s*(from|import) (cli|runs|models|locate|finetune|evaluate|merge|plot)\b", path.read_text(), re.M), path
    assert issubclass(DataError, ValueError)
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        open_task("nope")
