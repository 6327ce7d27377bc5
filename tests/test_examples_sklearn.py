"""The task-vector example runs end to end (reduced epochs) and its merges beat chance."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "task_vectors_sklearn.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("task_vectors_sklearn", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_runs_and_merges_beat_chance(example, capsys):
    results = example.main(base_epochs=1, task_epochs=3, seed=0, verbose=True)
    printed = capsys.readouterr().out
    merges = list(example.MERGES)
    assert set(results) == {"base", *(f"finetuned task{t} only" for t in (1, 2, 3)), *merges}
    for name, row in results.items():
        assert name in printed
        for key in ("overall", "task1", "task2", "task3", "task_mean"):
            assert 0.0 <= row[key] <= 1.0 and not math.isnan(row[key]), (name, key)
    task_chance = sum(1 / len(c) for c in example.TASKS) / len(example.TASKS)
    for name in merges:
        assert results[name]["lambda"] in example.LAMBDAS
        assert results[name]["task_mean"] > task_chance + 0.2, name
        assert results[name]["overall"] > 0.1, name  # 10-way chance
    # averaging the task vectors recovers every task better than the average single fine-tuned model does
    single = sum(results[f"finetuned task{t} only"]["task_mean"] for t in (1, 2, 3)) / 3
    assert results["average (linear)"]["task_mean"] > single
