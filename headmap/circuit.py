"""Knowledge circuits: which heads each layer keeps, in the paper's file format.

    {"knowledge_circuit": {layer: {"retain_heads": [head, ...]}}}     0-based layer and head indices

locate.py writes it as heads.json (with its measurements beside the circuit); the official release stores the same
dictionary as a torch file. A circuit in memory is {layer: sorted heads}.
"""
import json

import torch


def read_circuit(path: str) -> dict[int, list[int]]:
    """The circuit in a JSON file (heads.json) or a torch file (the official format), told apart by their first
    bytes. Raises ValueError naming what is wrong with the content; FileNotFoundError where there is no file."""
    with open(path, "rb") as f:
        start = f.read(64).lstrip()
    if start.startswith(b"PK") or start.startswith(b"\x80"):  # torch.save's zip archive, or its older pickle
        data = torch.load(path, map_location="cpu", weights_only=True)
    elif start.startswith(b"{") or path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    else:
        raise ValueError("it is neither JSON nor a torch file")
    return circuit_from(data)


def circuit_from(data) -> dict[int, list[int]]:
    """The circuit in the file format's dictionary (read from either file, or a heads.json already parsed).
    Raises ValueError naming what is wrong: a missing key, an index that is not an integer, no heads at all."""
    try:
        circuit = {_index(layer, "layer"): sorted(_index(h, f"layer {layer}'s head") for h in _heads(entry))
                   for layer, entry in data["knowledge_circuit"].items()}
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"not a knowledge circuit ({type(err).__name__}: {err}); expected "
                         '{"knowledge_circuit": {layer: {"retain_heads": [...]}}}') from None
    if not any(circuit.values()):
        raise ValueError("the circuit names no heads")
    return circuit


def _heads(entry: dict) -> list:
    """An entry's retain_heads: a list, or the integer tensor the official torch file may hold."""
    heads = entry["retain_heads"]
    if isinstance(heads, torch.Tensor):
        if heads.is_floating_point() or heads.is_complex() or heads.dim() != 1:
            raise ValueError(f"retain_heads is a {heads.dim()}-d {heads.dtype} tensor, not a list of head indices")
        return heads.tolist()
    if not isinstance(heads, (list, tuple)):
        raise ValueError(f"retain_heads is {heads!r}, not a list of head indices")
    return list(heads)


def _index(value, what: str) -> int:
    """A layer or head index as the file holds it: an integer (a layer also as a string of digits, the only way
    JSON writes an object key). A float, a bool or any other string is refused: 1.5 names no head."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if what == "layer" and isinstance(value, str) and value.isdigit() and value.isascii():
        return int(value)
    raise ValueError(f"{what} index {value!r} is not an integer; indices are 0-based integers")


def circuit_entry(circuit: dict[int, list[int]]) -> dict:
    """The file format's dictionary for `circuit`: what read_circuit reads back."""
    return {"knowledge_circuit": {str(layer): {"retain_heads": heads} for layer, heads in sorted(circuit.items())}}


def check_circuit(circuit: dict[int, list[int]], layers: int, heads: int) -> None:
    """Raise ValueError unless every layer and head of `circuit` exists in a model of `layers` x `heads`, once."""
    for layer, chosen in circuit.items():
        if not 0 <= layer < layers:
            raise ValueError(f"layer {layer} is out of range for a model with {layers} layers")
        bad = [h for h in chosen if not 0 <= h < heads]
        if bad:
            raise ValueError(f"layer {layer} head(s) {bad} out of range for {heads} heads per layer")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"layer {layer} lists a head twice: {chosen}")


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
