"""Model merging with task vectors, outside LoRA: scikit-learn digits and a small torch MLP.

1. Pre-train a "base" MLP briefly (one epoch) on all ten digit classes.
2. Fine-tune one copy per task. A task is a subset of the classes: {0,1,2,3}, {4,5,6} or {7,8,9}. Its loss is
   a softmax over its own classes only (the classic task-aware multi-task setting: each task has its own
   output rows). Each copy becomes good at its own task, and its backbone drifts away from the other tasks.
3. Task vectors: tau_t = theta_t - theta_base, one tensor per parameter.
4. Merge the task vectors parameter by parameter with ``adaptermerge.ops`` (``am.ops.ties(...)`` etc.) and
   pick the scaling coefficient lambda on a validation split. Then report the test accuracy of
   ``theta_base + merged``:
   - per task: the argmax over that task's classes, for the test digits of that task;
   - "10-way": the argmax over all ten classes (class-incremental, a harder metric that no merge is tuned for).

Run:  OMP_NUM_THREADS=1 python examples/task_vectors_sklearn.py      (a few seconds; seeded; no downloads)
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import adaptermerge as am

TASKS: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3), (4, 5, 6), (7, 8, 9))
LAMBDAS = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)

State = dict[str, torch.Tensor]
Merge = Callable[[Sequence[torch.Tensor], float], torch.Tensor]

#: name -> (merge of one parameter's task vectors at scale lambda, whether lambda is tuned)
MERGES: dict[str, tuple[Merge, bool]] = {
    "average (linear)": (lambda tvs, lam: am.ops.linear(tvs), False),
    "task_arithmetic": (lambda tvs, lam: am.ops.task_arithmetic(tvs, scale=lam), True),
    "ties (density 0.2)": (lambda tvs, lam: am.ops.ties(tvs, density=0.2, scale=lam), True),
    "dare_ties (density 0.5)": (lambda tvs, lam: am.ops.dare_ties(tvs, density=0.5, scale=lam, seed=0), True),
    "della (density 0.5)": (lambda tvs, lam: am.ops.della(tvs, density=0.5, epsilon=0.2, scale=lam, seed=0), True),
}


@dataclass(frozen=True)
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def subset(self, classes: Sequence[int]) -> Split:
        keep = torch.isin(self.y, torch.tensor(classes))
        return Split(self.x[keep], self.y[keep])


def load_splits(seed: int) -> tuple[Split, Split, Split]:
    """Digits (1797 images of 8x8, scaled to [0, 1]) split 60/20/20 into train/validation/test."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    x_tr, x_va, y_tr, y_va = train_test_split(x_tr, y_tr, test_size=0.25, stratify=y_tr, random_state=seed)
    to = lambda a, b: Split(torch.from_numpy(a), torch.from_numpy(b))  # noqa: E731
    return to(x_tr, y_tr), to(x_va, y_va), to(x_te, y_te)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def train(
    model: nn.Module, data: Split, epochs: int, lr: float, seed: int, classes: Sequence[int] | None = None
) -> nn.Module:
    """Mini-batch SGD with momentum; the batch order comes from a seeded generator.

    With ``classes``, the loss is a softmax over those classes only: a task learns to tell its own digits
    apart without being told to push every other digit down.
    """
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    cols = torch.arange(10) if classes is None else torch.tensor(classes)
    target = torch.full((10,), -1, dtype=torch.long)
    target[cols] = torch.arange(len(cols))
    for _ in range(epochs):
        order = torch.randperm(len(data.y), generator=gen)
        for start in range(0, len(order), 32):
            idx = order[start : start + 32]
            opt.zero_grad()
            loss_fn(model(data.x[idx])[:, cols], target[data.y[idx]]).backward()
            opt.step()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, data: Split, classes: Sequence[int] | None = None) -> float:
    """Fraction of correct predictions; with ``classes``, the prediction is the argmax over those classes."""
    if len(data.y) == 0:
        return float("nan")
    cols = torch.arange(10) if classes is None else torch.tensor(classes)
    return float((cols[model(data.x)[:, cols].argmax(1)] == data.y).float().mean())


def state_of(model: nn.Module) -> State:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def merged_model(
    base: nn.Module, base_state: State, task_vectors: Sequence[State], merge: Merge, lam: float
) -> nn.Module:
    """theta_base + merge(task vectors), parameter by parameter."""
    model = copy.deepcopy(base)
    model.load_state_dict({k: base_state[k] + merge([tv[k] for tv in task_vectors], lam) for k in base_state})
    return model


def report(model: nn.Module, test: Split) -> dict[str, float]:
    row = {"overall": accuracy(model, test)}
    for t, classes in enumerate(TASKS):
        row[f"task{t + 1}"] = accuracy(model, test.subset(classes), classes)
    row["task_mean"] = float(np.mean([row[f"task{t + 1}"] for t in range(len(TASKS))]))
    return row


def main(
    base_epochs: int = 1, task_epochs: int = 10, seed: int = 0, verbose: bool = True
) -> dict[str, dict[str, float]]:
    """Train, fine-tune, merge.

    Returns ``{row name: {"overall": 10-way acc, "task1".."task3": per-task acc, "task_mean": their mean,
    "lambda": the chosen scale (merges only)}}``.
    """
    train_set, val_set, test_set = load_splits(seed)
    base = train(make_model(seed), train_set, base_epochs, lr=0.01, seed=seed)
    base_state = state_of(base)
    finetuned = [
        train(copy.deepcopy(base), train_set.subset(classes), task_epochs, lr=0.02, seed=seed + 1 + t, classes=classes)
        for t, classes in enumerate(TASKS)
    ]
    task_vectors = [{k: v - base_state[k] for k, v in state_of(m).items()} for m in finetuned]

    results: dict[str, dict[str, float]] = {"base": report(base, test_set)}
    for t, m in enumerate(finetuned):
        results[f"finetuned task{t + 1} only"] = report(m, test_set)
    for name, (merge, tuned) in MERGES.items():
        scores = {
            lam: report(merged_model(base, base_state, task_vectors, merge, lam), val_set)["task_mean"]
            for lam in (LAMBDAS if tuned else (1.0,))
        }
        best = max(scores, key=lambda lam: scores[lam])  # first of equal scores: the smallest lambda
        results[name] = {**report(merged_model(base, base_state, task_vectors, merge, best), test_set), "lambda": best}
    if verbose:
        print_table(results)
    return results


def print_table(results: dict[str, dict[str, float]]) -> None:
    cols = [f"task{t + 1}" for t in range(len(TASKS))] + ["task_mean", "overall"]
    heads = ["task " + "".join(map(str, c)) for c in TASKS] + ["task mean", "10-way", "lambda"]
    width = max(len(k) for k in results) + 2
    print("test accuracy".ljust(width) + "".join(h.rjust(13) for h in heads))
    for name, row in results.items():
        cells = [f"{row[c]:.3f}" for c in cols] + [f"{row['lambda']:g}" if "lambda" in row else "-"]
        print(name.ljust(width) + "".join(c.rjust(13) for c in cells))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-epochs", type=int, default=1)
    parser.add_argument("--task-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    main(args.base_epochs, args.task_epochs, args.seed)
