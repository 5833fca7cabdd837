"""Datasets, prompt formats, tokenisation, batching and scoring shared by locate, finetune and evaluate."""
from data.scoring import accuracy, build_prompts, encode_pair, pad_id_of, pad_right, score_examples
from data.tasks import (DATA_DIR_HELP, DATASETS, PROMPT_STYLES, Example, check_dataset, data_source, default_data_dir,
                        load_examples, load_rows)

__all__ = ["DATASETS", "DATA_DIR_HELP", "PROMPT_STYLES", "Example", "accuracy", "build_prompts", "check_dataset",
           "data_source", "default_data_dir", "encode_pair", "load_examples", "load_rows", "pad_id_of", "pad_right",
           "score_examples"]
