"""GSM8K questions kept in the repository for tests, the demo and the accuracy benchmark.

``data/gsm8k_test_200.jsonl`` holds the first 200 rows of openai/grade-school-math's test split
(MIT license, ``data/gsm8k_LICENSE``); the environment variable ``GSM8K_PATH`` points to another
copy, e.g. the full 1319-row file.
"""

import json
import os
from typing import Dict, List

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
IN_REPO_GSM8K = os.path.join(REPO_ROOT, "data", "gsm8k_test_200.jsonl")


def gsm8k_path() -> str:
    """``GSM8K_PATH`` if set, else the repository's 200-question file."""
    return os.environ.get("GSM8K_PATH") or IN_REPO_GSM8K


def gsm8k_rows(count: int, path: str = "") -> List[Dict[str, str]]:
    """The first ``count`` rows (``question``, ``answer`` ending in ``#### N``) of the GSM8K
    jsonl at ``path`` (default ``gsm8k_path()``)."""
    with open(path or gsm8k_path()) as f:
        rows = [json.loads(line) for line in f][:count]
    if len(rows) < count:
        raise ValueError(f"{path or gsm8k_path()} has {len(rows)} questions, {count} asked: "
                         f"set GSM8K_PATH to a longer gsm8k_test.jsonl")
    return rows


def gsm8k_questions(count: int, path: str = "") -> List[str]:
    """The first ``count`` questions of the GSM8K jsonl at ``path`` (default ``gsm8k_path()``)."""
    return [row["question"] for row in gsm8k_rows(count, path)]
