"""HeadMap's library: copy this folder into any codebase, under any name; it imports nothing of the scripts.

    attention.py   the masked-attention Triton kernel (and its PyTorch reference)
    masking.py     mask_heads(model, mask): ablate heads per sequence through transformers' AttentionInterface
    circuit.py     knowledge circuits: the file format, head masks, random circuits of the same shape
    adapters.py    HeadMap, LoRA and DoRA adapters: attach, save, load, merge
    files.py       the atomic writer its files go through
"""
