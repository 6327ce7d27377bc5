"""``adaptermerge taskmerge ...``: merge quality on a real model, from the command line (a plugin of the core CLI).

Imports only typer at import time; the stages import torch/transformers when they run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    help="Task merging: train one LoRA per task on SmolLM2, merge them with every registered operator, measure "
    "exact-match accuracy per task. Stages: prepare -> train -> merge -> evaluate -> report; `run` does all and "
    "resumes what is finished.",
    no_args_is_help=True,
)

CONFIG = typer.Argument(..., help="A run config (.toml), e.g. recipes/taskmerge-quick.toml.")
THREADS = typer.Option(None, "--threads", help="torch threads (default: the config's `threads`, else torch's default).")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")


def _load(config: Path, threads: Optional[int]):
    import torch

    from weaverec.cli import _quiet_libraries

    _quiet_libraries()
    from .config import load_config

    cfg = load_config(config)
    n = threads or cfg.threads
    if n:
        torch.set_num_threads(n)
    return cfg


def _log(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(msg, markup=False)


@app.command()
def run(config: Path = CONFIG, threads: Optional[int] = THREADS, quiet: bool = QUIET) -> None:
    """Prepare the tasks, train every adapter, merge, evaluate every model and write the report."""
    import time

    from .pipeline import run as run_all

    t0 = time.perf_counter()
    cfg = _load(config, threads)
    run_all(cfg, log=_log, progress=not quiet)
    _log(f"done in {time.perf_counter() - t0:.0f} s; report in {cfg.run_dir / 'report'}")


@app.command()
def prepare(config: Path = CONFIG) -> None:
    """Generate every task's train / validation / test splits."""
    from .pipeline import prepare as prep

    prep(_load(config, None), log=_log)


@app.command()
def train(
    config: Path = CONFIG,
    adapter: Optional[list[str]] = typer.Option(None, "--adapter", "-a", help="Train only this adapter (repeatable): a task name or multitask."),
    threads: Optional[int] = THREADS,
    quiet: bool = QUIET,
) -> None:
    """Train the per-task LoRAs and the multi-task LoRA (skips finished ones)."""
    from .pipeline import prepare as prep, train as tr

    cfg = _load(config, threads)
    tr(cfg, prep(cfg, log=_log), only=adapter, log=_log, progress=not quiet)


@app.command()
def merge(config: Path = CONFIG) -> None:
    """Merge the adapters with every registered operator, the validation grid and the pairs (skips finished ones)."""
    from .pipeline import merge as mg

    mg(_load(config, None), log=_log)


@app.command()
def evaluate(config: Path = CONFIG, threads: Optional[int] = THREADS) -> None:
    """Score every model (cached per model), choose the tuned rows on validation, then write the report."""
    from .pipeline import evaluate as ev, prepare as prep
    from .report import write_report

    cfg = _load(config, threads)
    splits = prep(cfg, log=_log)
    write_report(cfg, splits, ev(cfg, splits, log=_log), log=_log)


@app.command()
def report(config: Path = CONFIG) -> None:
    """Write the report (evaluates whatever is not cached yet)."""
    evaluate(config, None)


if __name__ == "__main__":
    app()
