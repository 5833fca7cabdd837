"""Datasets, prompt formats, tokenisation, batching and scoring shared by locate, finetune and evaluate.

data.tasks (datasets and prompts) imports no torch, so the scripts answer --help and bad arguments at once;
data.scoring (tokenisation, batching, scoring) does.
"""
