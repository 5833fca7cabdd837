"""Knowledge circuits: which heads each layer keeps, read from our heads.json or the official torch file.

Both hold {"knowledge_circuit": {layer: {"retain_heads": [head, ...]}}} with 0-based indices.
"""
import json

import torch

from kernels.model import UsageError


def read_circuit(path: str) -> dict[int, list[int]]:
    try:
        if path.endswith(".json"):
            with open(path) as f:
                data = json.load(f)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
        circuit = {int(layer): sorted(int(h) for h in entry["retain_heads"])
                   for layer, entry in data["knowledge_circuit"].items()}
    except FileNotFoundError:
        raise UsageError(f"circuit file {path} does not exist; run locate.py first or fix the path") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"circuit file {path} is not valid JSON ({err.msg}, line {err.lineno})") from None
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, OSError) as err:
        raise UsageError(f"circuit file {path} is not a knowledge circuit ({type(err).__name__}: {err}); expected "
                         '{"knowledge_circuit": {layer: {"retain_heads": [...]}}}') from None
    if not circuit or not any(circuit.values()):
        raise UsageError(f"circuit file {path} names no heads")
    return circuit


def check_circuit(circuit: dict[int, list[int]], layers: int, heads: int, source: str = "circuit") -> None:
    for layer, chosen in circuit.items():
        if not 0 <= layer < layers:
            raise UsageError(f"{source}: layer {layer} is out of range for a model with {layers} layers")
        bad = [h for h in chosen if not 0 <= h < heads]
        if bad:
            raise UsageError(f"{source}: layer {layer} head(s) {bad} out of range for {heads} heads per layer")
        if len(set(chosen)) != len(chosen):
            raise UsageError(f"{source}: layer {layer} lists a head twice: {chosen}")


def circuit_mask(circuit: dict[int, list[int]], layers: int, heads: int) -> torch.Tensor:
    """Bool (layers, heads), True at the circuit's heads: the mask that ablates the circuit."""
    mask = torch.zeros(layers, heads, dtype=torch.bool)
    for layer, chosen in circuit.items():
        mask[layer, chosen] = True
    return mask


def random_circuit_like(circuit: dict[int, list[int]], heads: int, generator: torch.Generator) -> dict[int, list[int]]:
    """The paper's control: as many heads in each layer as the circuit, chosen uniformly at random."""
    return {layer: sorted(torch.randperm(heads, generator=generator)[:len(chosen)].tolist())
            for layer, chosen in circuit.items()}
