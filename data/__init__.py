"""The tasks and the scoring shared by locate, finetune and evaluate: rows in, the library's samples and batches and
the tasks' metrics out.

    common.py        the kinds of task, Example, the Task interface, its splits and held-out rows
    files.py         DataError, the checked reader of a file the user hands over, and rows from JSONL/JSON/CSV/Parquet
    commonsense.py   the paper's eight datasets and their two prompt styles
    user_files.py    a file or folder of the user's own rows
    lm_eval_tasks.py any multiple-choice task of lm-evaluation-harness
    tasks.py         open_task: the task a --dataset value names (imports the three kinds; none imports it)
    scoring.py       tokenisation, log-likelihood scoring of the choices, and the metrics
    training.py      the training texts and batches of fine-tuning

Everything but scoring.py imports no torch, so the scripts answer --help and bad arguments at once.
"""
