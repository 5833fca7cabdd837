"""Run under torchrun by tests/test_fsdp.py: shards a model folder with --fsdp's own loader and reports, per rank,
what the sharding is made of: which modules are FSDP units, how many times this rank read the weights from disk,
and the most parameter bytes held unsharded at once during a forward (what one forward gathers).

    torchrun --nproc_per_node 2 tests/fsdp_probe.py MODEL_FOLDER OUT.json
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from headmap import distributed  # noqa: E402
from headmap.masking import decoder_layers  # noqa: E402
from cli.torchrun import start_distributed  # noqa: E402
from cli.torchrun import load_sharded  # noqa: E402

folder, out = sys.argv[1], sys.argv[2]
start_distributed(torch.device("cpu"), fsdp=True)
reads = [0]
load = transformers.AutoModelForCausalLM.from_pretrained.__func__


def counted(cls, *args, **kwargs):  # every read of the weights from disk goes through here
    reads[0] += 1
    return load(cls, *args, **kwargs)


transformers.AutoModelForCausalLM.from_pretrained = classmethod(counted)
model = load_sharded(folder, torch.float32, torch.device("cpu"))
names = {module: name for name, module in model.named_modules()}
units = sorted(names[m] for m in model.modules() if isinstance(m, FSDPModule))
layers = sorted(names[m] for m in decoder_layers(model))


def gathered() -> int:
    """Bytes of the parameters this rank holds unsharded right now (a sharded one is a DTensor)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if not isinstance(p, DTensor))


most = [0]
for layer in decoder_layers(model):  # after FSDP's own pre-forward hook, which gathers the layer
    layer.register_forward_pre_hook(lambda module, args: most.__setitem__(0, max(most[0], gathered())))
with torch.no_grad():
    model(input_ids=torch.tensor([[1, 2, 3]]))
full = sum(p.numel() * p.element_size() for p in model.parameters())
root = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if ".layers." not in f".{name}")
layer_bytes = sum(p.numel() * p.element_size() for p in decoder_layers(model)[0].parameters())
record = {"rank": distributed.rank(), "units": units, "decoder_layers": layers, "reads": reads[0],
          "most_gathered_bytes": most[0], "full_bytes": full, "root_bytes": root, "layer_bytes": layer_bytes}
records = distributed.all_gather(record)
if distributed.rank() == 0:
    Path(out).write_text(json.dumps(records))
dist.destroy_process_group()
