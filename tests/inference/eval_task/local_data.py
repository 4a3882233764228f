"""The example tasks' data: JSONL files beside this module, read without the network."""

import json
from pathlib import Path

import datasets


def jsonl_split(data_file: str, **task_metadata) -> datasets.DatasetDict:
    """``data_file`` (relative to this folder) as the ``test`` split; lm_eval passes the task's
    ``dataset_kwargs`` and its metadata as keywords."""
    path = Path(__file__).resolve().parent / data_file
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
