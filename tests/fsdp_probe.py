"""Run under torchrun by tests/test_fsdp.py: shards a model folder with --fsdp's own loader and reports, per rank,
what the sharding is made of: which modules are FSDP units, how many times this rank read the weights from disk,
the most parameter bytes held unsharded at once during a forward (what one forward gathers), and what is gathered
while the LM head runs (the input embeddings should not be).

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


most, at_head = [0], {}
head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
for module in [*decoder_layers(model), head]:  # after FSDP's own pre-forward hook, which gathers the unit
    module.register_forward_pre_hook(lambda module, args: most.__setitem__(0, max(most[0], gathered())))
head.register_forward_pre_hook(lambda module, args: at_head.update(
    bytes=gathered(), embeddings_sharded=isinstance(embeddings.weight, DTensor)))
with torch.no_grad():
    model(input_ids=torch.tensor([[1, 2, 3]]))


def size(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


unit_of = {id(p): name for name in units for p in model.get_submodule(name).parameters()}  # the innermost last
record = {"rank": distributed.rank(), "units": units, "decoder_layers": layers, "reads": reads[0],
          "most_gathered_bytes": most[0], "gathered_at_head": at_head, "full_bytes": size(model),
          "root_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if unit_of[id(p)] == ""),
          "layer_bytes": size(decoder_layers(model)[0]), "head_bytes": size(head),
          "embedding_bytes": size(embeddings)}
records = distributed.all_gather(record)
if distributed.rank() == 0:
    Path(out).write_text(json.dumps(records))
dist.destroy_process_group()
