"""headmap/ is a library: copied alone under another name it works in a fresh interpreter, and it sits beside Hugging
Face's `kernels` package (whose import name the library's old folder took) without either breaking the other."""
import os
import re
import shutil
import subprocess
import sys

from tests.conftest import ROOT
from tests.test_cli import run


def readme_library_example() -> str:
    """The README's library snippet: the python block after the 'library example' marker."""
    text = (ROOT / "README.md").read_text()
    return re.search(r"<!-- library example -->\s*```python\n(.*?)```", text, re.S).group(1)


def clean_env(**extra):
    """No TRITON_INTERPRET (the production CPU path), no PYTHONPATH (nothing of this repository on the path)."""
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")} | extra


def test_the_library_copied_under_another_name_runs_the_readme_example(tmp_path):
    shutil.copytree(ROOT / "headmap", tmp_path / "vendor" / "hm_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "example.py").write_text(readme_library_example())
    check = "import sys; assert not any(p.startswith(%r) for p in sys.path if p), sys.path\n" % str(ROOT)
    (tmp_path / "sitecheck.py").write_text(check)
    for script in ("sitecheck.py", "example.py"):  # -E: no PYTHONPATH; -s: no user site; cwd: the other project
        done = subprocess.run([sys.executable, "-E", "-s", script], cwd=tmp_path, capture_output=True, text=True,
                              env=clean_env(), timeout=600)
        assert done.returncode == 0, done.stderr
    assert "masked, trained, saved, loaded and merged" in done.stdout
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    for path in (tmp_path / "vendor" / "hm_kernels").glob("*.py"):  # relative imports only, no script code
        source = path.read_text()
        assert not re.search(r"^\s*(from|import) (headmap|cli|data|kernels)\b", source, re.M), path.name
        assert "argparse" not in source and "UsageError" not in source, path.name


def fake_kernels_package(site):
    """Hugging Face's `kernels` at a version transformers accepts (0.18.x; the registry here has only older ones):
    its dist-info, which is what is_kernels_available() reads, and a package with the names transformers imports."""
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text(
        "class _Stub:\n    TRAINING = INFERENCE = TORCH_COMPILE = 'mode'\n"
        "    def __init__(self, *args, **kwargs):\n        pass\n"
        "def _decorator(*args, **kwargs):\n    return lambda obj: obj\n"
        "CUDAProperties = Device = KernelizeFallback = LayerRepository = LocalLayerRepository = Mode = ROCMProperties = _Stub\n"
        "register_kernel_mapping = replace_kernel_forward_from_hub = use_kernel_mapping = get_kernel = kernelize = _Stub\n"
        "use_kernel_forward_from_hub = use_kernelized_func = _decorator\n")
    info = site / "kernels-0.18.5.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.18.5\n")


def test_every_script_runs_with_hugging_faces_kernels_package_installed(tiny_run, tmp_path):
    fake_kernels_package(tmp_path / "site")
    env = clean_env(PYTHONPATH=str(tmp_path / "site"))
    seen = subprocess.run([sys.executable, "-c", "from transformers.utils import is_kernels_available as a; "
                           "import transformers.activations, kernels; print(a(), kernels.__file__)"],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert seen.returncode == 0 and seen.stdout.split() == ["True", str(tmp_path / "site" / "kernels" / "__init__.py")], \
        seen.stdout + seen.stderr  # transformers sees the package, from the repository's root too
    model, heads, adapter = str(tiny_run / "model"), str(tmp_path / "heads.json"), str(tmp_path / "adapter")
    quiet = ["--no-progress"]
    for script in (["locate.py", "--model", model, "--dataset", "arc_easy", "--prompt", "harness", "--pool", "16",
                    "--samples", "2", "--validate-limit", "4", "--random-trials", "1", "--out", heads, *quiet],
                   ["finetune.py", "--heads", heads, "--train-limit", "8", "--max-steps", "1", "--val-limit", "2",
                    "--eval-limit", "2", "--out", adapter, *quiet],
                   ["evaluate.py", "--dataset", "arc_easy", "--limit", "2", "--adapter", adapter, *quiet],
                   ["merge.py", "--adapter", adapter, "--out", str(tmp_path / "merged")],
                   ["plot.py", "heatmap", heads, "--out", str(tmp_path / "heads.png")]):
        done = run(*script, env=env)
        assert done.returncode == 0, f"{script[0]}: {done.stderr}"
    assert (tmp_path / "merged" / "model.safetensors").exists() and (tmp_path / "heads.png").exists()
