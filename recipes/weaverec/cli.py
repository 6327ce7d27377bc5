"""``adaptermerge weaverec ...``: the WeaveRec recipe from the command line (a plugin of the core CLI).

This module imports only typer at import time so that ``adaptermerge --help`` stays fast; the stages import
torch/transformers when they run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    help="WeaveRec: cross-train LoRA modules on target + source domains and fuse them by merging. "
    "Stages: prepare -> train -> merge -> evaluate -> report; `run` does all and resumes what is finished.",
    no_args_is_help=True,
)

CONFIG = typer.Argument(..., help="A run config (.toml/.yaml), e.g. recipes/quick.toml.")
THREADS = typer.Option(None, "--threads", help="torch threads (default: the config's `threads`, else torch's default).")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")


def _quiet_libraries() -> None:
    """Silence library chatter (weight-loading bars, deprecation notices) that would drown the pipeline's log."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _load(config: Path, threads: Optional[int]):
    import torch

    _quiet_libraries()
    from .config import load_config

    cfg = load_config(config)
    if threads:  # --threads wins over the config's `threads`, also inside run() (which applies cfg.threads)
        cfg = dataclasses.replace(cfg, threads=threads)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return cfg


def _log(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(msg, markup=False)


@app.command()
def run(config: Path = CONFIG, threads: Optional[int] = THREADS, quiet: bool = QUIET) -> None:
    """Prepare the data, train every module, merge, evaluate every model and write the report."""
    import time

    from .pipeline import run as run_all

    t0 = time.perf_counter()
    cfg = _load(config, threads)
    report = run_all(cfg, log=_log, progress=not quiet)
    if "rows" in report:
        _log(f"done in {time.perf_counter() - t0:.0f} s; report in {cfg.run_dir / 'report'}")


@app.command()
def prepare(config: Path = CONFIG) -> None:
    """Load the data, split domains and users, build the leave-one-out samples."""
    from .pipeline import prepare as prep

    prep(_load(config, None), log=_log)


@app.command()
def train(
    config: Path = CONFIG,
    module: Optional[list[str]] = typer.Option(None, "--module", "-m", help="Train only this module (repeatable): target, hybrid-<src>, source-<src>, pooled."),
    threads: Optional[int] = THREADS,
    quiet: bool = QUIET,
) -> None:
    """Train the LoRA modules (skips finished ones). Works under `accelerate launch` / `torchrun`."""
    from .pipeline import prepare as prep, train as tr

    cfg = _load(config, threads)
    tr(cfg, prep(cfg, log=_log), only=module, log=_log, progress=not quiet)


@app.command()
def merge(config: Path = CONFIG) -> None:
    """Merge the trained modules as the config's `merges` say (core adaptermerge operators)."""
    from .pipeline import merge as mg

    mg(_load(config, None), log=_log)


@app.command()
def evaluate(
    config: Path = CONFIG,
    row: Optional[list[str]] = typer.Option(None, "--row", help="Evaluate only this row (repeatable), by name or key."),
    threads: Optional[int] = THREADS,
    quiet: bool = QUIET,
) -> None:
    """Score every test user with every model (cached per model), then write the report."""
    from .pipeline import evaluate as ev, prepare as prep
    from .report import write_report

    cfg = _load(config, threads)
    p = prep(cfg, log=_log)
    results = ev(cfg, p, log=_log, progress=not quiet, only=row)
    if not row:
        write_report(cfg, p, results, log=_log)


@app.command()
def report(config: Path = CONFIG) -> None:
    """Write the report from cached evaluation results."""
    from .pipeline import evaluate as ev, prepare as prep
    from .report import write_report

    cfg = _load(config, None)
    p = prep(cfg, log=_log)
    write_report(cfg, p, ev(cfg, p, log=_log, progress=False), log=_log)


if __name__ == "__main__":  # `python -m weaverec.cli ...`, e.g. under `accelerate launch -m` or `torchrun -m`
    app()
