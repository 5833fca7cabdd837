"""--report-to: a run's settings and numbers sent to the trackers researchers watch (TensorBoard, Weights & Biases,
MLflow), each through its own library, as Hugging Face Trainer's report_to does. Optional: a tracker that is not
installed is refused in one line with its pip command, before the model loads.

Only rank 0 reports. A tracker that fails mid-run (network, disk) warns once and is dropped; the run and its own
files go on. A resumed run continues the same tracker run (its id kept in the run's files) and sends no step
twice: the steps its log had recorded before the interruption were sent already, and are skipped.
"""
import argparse
import importlib
import os
import sys

from .exits import UsageError

TRACKERS = {"tensorboard": ("torch.utils.tensorboard", "pip install tensorboard"),
            "wandb": ("wandb", "pip install wandb"),
            "mlflow": ("mlflow", "pip install mlflow")}


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report-to", default="none", help="send the run's settings and numbers to trackers: none, "
                   f"{', '.join(TRACKERS)}, or a comma list (TensorBoard writes into the run's trackers/ folder, W&B "
                   "offline without a key (wandb sync uploads it), MLflow to MLFLOW_TRACKING_URI or its default)")
    p.add_argument("--run-name", help="the run's name in the trackers (default: the --out folder's or file's name)")


def check_report_to(value: str) -> list[str]:
    """The trackers --report-to names, each importable: an unknown name or a missing package is one line."""
    names = [] if value == "none" else [n.strip() for n in value.split(",") if n.strip()]
    for name in names:
        if name not in TRACKERS:
            raise UsageError(f"--report-to {name}: not a tracker; pass none, {', '.join(TRACKERS)} or a comma list")
        module, pip = TRACKERS[name]
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise UsageError(f"--report-to {name} needs its package, which is not installed ({err}); {pip}") from None
    return list(dict.fromkeys(names))


def tracker_folder(out: str | None) -> str:
    """Where the trackers' local files go: trackers/ inside a run folder, <name>.trackers/ beside an output file
    (the top of a run folder stays what an upload needs), ./trackers without --out."""
    if out is None:
        return "trackers"
    return os.path.join(out, "trackers") if not os.path.splitext(out)[1] else os.path.splitext(out)[0] + ".trackers"


def default_run_name(out: str | None, script: str) -> str:
    return os.path.splitext(os.path.basename(os.path.normpath(out)))[0] if out else script


class Reporter:
    """The trackers of one run. `ids` are the tracker runs to continue ({tracker: id}, from an interrupted run's
    files); `sent` the last step they received before the interruption (later steps are sent, earlier ones not; -1:
    none)."""

    def __init__(self, names: list[str], folder: str, run_name: str, config: dict, ids: dict | None = None,
                 sent: int = -1):
        self.sent, self.runs, self.ids = sent, {}, dict(ids or {})
        for name in names:
            self._guard(name, lambda name=name: self.runs.__setitem__(name, self._start(name, folder, run_name,
                                                                                           config)))

    def _start(self, name: str, folder: str, run_name: str, config: dict):
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(os.path.join(folder, "tensorboard"))
            if not self.ids.get(name):  # a resumed run's settings are there already
                writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))
            self.ids[name] = "tensorboard"
            return writer
        if name == "wandb":
            import wandb
            os.makedirs(folder, exist_ok=True)
            offline = os.environ.get("WANDB_MODE") == "offline" or not (os.environ.get("WANDB_API_KEY") or
                                                                        _wandb_logged_in())
            run = wandb.init(project=os.environ.get("WANDB_PROJECT", "headmap"), name=run_name, dir=folder,
                             config=config, id=self.ids.get(name), resume="allow",
                             mode="offline" if offline else None, settings=wandb.Settings(silent=True))
            self.ids[name] = run.id
            return run
        import mlflow
        run = mlflow.start_run(run_id=self.ids.get(name), run_name=None if self.ids.get(name) else run_name)
        if not self.ids.get(name):
            mlflow.log_params({k: str(v)[:500] for k, v in config.items()})
        self.ids[name] = run.info.run_id
        return mlflow

    def _guard(self, name: str, call) -> None:
        """Run a tracker call; one that fails warns once and the tracker is dropped, the run goes on."""
        try:
            call()
        except Exception as err:  # a tracker's own failure (network, disk, its store) must not end a long run
            from headmap.errors import error_summary
            self.runs.pop(name, None)
            print(f"warning: --report-to {name} stopped: {error_summary(err, 200)}; the run goes on, its own files "
                  "whole", file=sys.stderr)

    def log(self, metrics: dict, step: int) -> None:
        """Numbers at `step`; a step the trackers received before an interruption is not sent again."""
        if step <= self.sent:
            return
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for name, run in list(self.runs.items()):
            if name == "tensorboard":
                self._guard(name, lambda: _scalars(run, numbers, step))
            elif name == "wandb":
                self._guard(name, lambda: run.log(numbers, step=step))
            else:
                self._guard(name, lambda: run.log_metrics(numbers, step=step))

    def image(self, key: str, png: str, step: int = 0) -> None:
        """A figure (a PNG file) under `key`."""
        for name, run in list(self.runs.items()):
            if name == "tensorboard":
                def add(run=run):
                    import matplotlib.image
                    run.add_image(key, matplotlib.image.imread(png)[..., :3], step, dataformats="HWC")
                self._guard(name, add)
            elif name == "wandb":
                def add(run=run):
                    import wandb
                    run.log({key: wandb.Image(png)}, step=max(step, self.sent + 1))
                self._guard(name, add)
            else:
                self._guard(name, lambda: run.log_artifact(png))

    def close(self) -> None:
        for name, run in list(self.runs.items()):
            self._guard(name, {"tensorboard": lambda: run.close(), "wandb": lambda: run.finish(),
                               "mlflow": lambda: run.end_run()}[name])
        self.runs.clear()


def _scalars(writer, numbers: dict, step: int) -> None:
    for key, value in numbers.items():
        writer.add_scalar(key, value, step)
    writer.flush()  # on disk at each step: what a TensorBoard watching the folder shows, and what a kill leaves


def _wandb_logged_in() -> bool:
    """Whether W&B has a key from `wandb login` (its netrc entry), without asking for one."""
    import netrc
    try:
        return bool(netrc.netrc().authenticators("api.wandb.ai"))
    except (OSError, netrc.NetrcParseError):
        return False


class NoReporter:
    """--report-to none, or a rank other than 0."""
    ids: dict = {}
    sent = -1

    def log(self, metrics: dict, step: int) -> None:
        pass

    def image(self, key: str, png: str, step: int = 0) -> None:
        pass

    def close(self) -> None:
        pass


def start_reporting(args: argparse.Namespace, script: str, config: dict, ids: dict | None = None, sent: int = -1):
    """The run's Reporter (rank 0, --report-to given), else a NoReporter."""
    from headmap import distributed
    names = check_report_to(args.report_to)
    if not names or distributed.rank() != 0:
        return NoReporter()
    return Reporter(names, tracker_folder(args.out), args.run_name or default_run_name(args.out, script), config,
                    ids, sent)
