"""``adaptermerge analyze``: diagnostics of LoRA adapters before merging them (rich tables, ``--json``, ``--plot``).

Only typer, rich and the standard library are imported here at module level; torch, the diagnostics and matplotlib
are imported when the command runs (matplotlib only for ``--plot``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import typer
from rich.console import Console
from rich.table import Table

from .cliparse import floats as _floats, one_or_many, operator_params
from .errors import OutputError, ParameterError

_out = Console(soft_wrap=True)
_err = Console(stderr=True, soft_wrap=True)

SORTS = ("conflict", "cosine", "norm", "name")
PLOT_HINT = "pip install adaptermerge[plot]"


# ------------------------------------------------------------------------------------------------ parsing
def _preview_rank(value: Optional[str]) -> int | str | None:
    if value is None or value == "full":
        return value
    try:
        return int(value)
    except ValueError:
        raise ParameterError(f"--preview-rank must be a positive integer or 'full', got {value!r}") from None


def build_preview(
    method: Optional[str], weights: Optional[str], rank: Optional[str], modules: Optional[int], params: dict[str, Any],
    pairs: Optional[list[str]] = None,
) -> dict[str, Any] | None:
    """The preview spec from the command-line options; operator options without --preview-method are an error."""
    given = {k: v for k, v in params.items() if v is not None}
    if method is None:
        extra = [f"--{k.replace('_', '-')}" for k in given] + [f"-p {x}" for x in pairs or []]
        extra += [o for o, v in (("--weights", weights), ("--preview-rank", rank), ("--preview-modules", modules)) if v is not None]
        if extra:
            raise ParameterError(f"{', '.join(extra)} given without --preview-method: these options set up a merge "
                                 "preview (e.g. --preview-method ties)")
        return None
    if "density" in given:
        given["density"] = one_or_many(_floats(given["density"], "--density"))
    given = operator_params(method, pairs, given)
    spec: dict[str, Any] = {"method": method, "params": given, "rank": _preview_rank(rank), "modules": modules}
    if weights is not None:
        spec["weights"] = _floats(weights, "--weights")
    return spec


PLOT_FORMATS = (".png", ".svg", ".pdf", ".jpg", ".jpeg", ".webp", ".eps", ".ps", ".tif", ".tiff")


def _check_plot_target(plot: Path) -> None:
    """Fail before the analysis if the picture cannot be made: matplotlib missing, unknown format, bad folder."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ParameterError(f"--plot needs matplotlib, which is not installed: {PLOT_HINT}")
    if plot.suffix.lower() not in PLOT_FORMATS:
        raise ParameterError(f"--plot {plot}: the file name must end in one of {', '.join(PLOT_FORMATS)}")
    parent = plot.parent if str(plot.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{plot}: folder {parent} does not exist")
    if plot.is_dir():
        raise OutputError(f"{plot} is a directory; give a file name such as diagnostics.png")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{plot}: folder {parent} is not writable")


# ------------------------------------------------------------------------------------------------ formatting
def natural_key(name: str) -> list:
    """Sort key that orders numbers by value: layers.2 before layers.10 (text order puts 10 and 11 before 2)."""
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name))]


def _short(name: str) -> str:
    return name.removeprefix("base_model.model.").removeprefix("model.")


def _f(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _cos(x: float | None) -> str:
    if x is None:
        return "-"
    style = "red" if x < 0 else "green" if x > 0.5 else ""
    text = f"{x:+.3f}"
    return f"[{style}]{text}[/]" if style else text


def _pct(c: dict[str, Any] | None, with_err: bool = False) -> str:
    if not c or c.get("rate") is None:
        return "-"
    text = f"{100 * c['rate']:.1f}%"
    if with_err:
        se = c.get("se") or 0.0
        text += " (exact)" if se == 0 else f" ± {100 * 1.96 * se:.1f}"
    return text


def _pair_cells(rec: dict[str, Any], n_pairs: int, wide: bool) -> list[str]:
    """Per pair 'cos / conflict' cells (wide), or 'mean (min)' cosine and 'mean (max)' conflict over pairs."""
    if wide:
        return [f"{_cos(rec['cosine'][p])} / {_pct(rec['conflict'][p])}" for p in range(n_pairs)]
    cos = [c for c in rec["cosine"] if c is not None]
    rates = [c["rate"] for c in rec["conflict"] if c and c.get("rate") is not None]
    cos_cell = f"{_cos(sum(cos) / len(cos))} ({_cos(min(cos))})" if cos else "-"
    conf_cell = f"{100 * sum(rates) / len(rates):.1f}% ({100 * max(rates):.1f}%)" if rates else "-"
    return [cos_cell, conf_cell]


def _pair_headers(labels: Sequence[str], wide: bool) -> list[str]:
    return [f"{p}\ncos / conflict" for p in labels] if wide else ["cos\nmean (min)", "conflict\nmean (max)"]


def _score(rec: dict[str, Any], sort: str) -> tuple:
    """Sort key of a module: mean conflict over its pairs (descending), mean cosine (ascending), largest norm, name."""
    rates = [c["rate"] for c in rec["conflict"] if c and c.get("rate") is not None]
    cos = [c for c in rec["cosine"] if c is not None]
    norms = [x for x in rec["norm"] if x is not None]
    name = natural_key(rec["name"])
    if sort == "conflict":
        return (-(sum(rates) / len(rates)) if rates else 1.0, name)
    if sort == "cosine":
        return (sum(cos) / len(cos) if cos else 2.0, name)
    if sort == "norm":
        return (-(max(norms) if norms else 0.0), name)
    return (name,)


def render(result: dict[str, Any], console: Console, *, top: int, sort: str) -> None:
    """The terminal report: inputs, pairs, per layer, per type, worst modules, merge preview."""
    labels = [i["label"] for i in result["inputs"]]
    plabels = result["pair_labels"]
    n_pairs = len(plabels)
    wide = n_pairs <= 3
    st = result["settings"]
    overall = result["overall"]
    n_mod = len(result["modules"])
    exact = sum(1 for m in result["modules"] if m["exact"])
    enumerated = f"; {exact} module(s) small enough to enumerate exactly" if exact else ""
    console.print(
        f"[bold]{len(labels)} adapters, {n_mod} modules.[/] Sign conflicts among each delta's top "
        f"{100 * st['top_k_fraction']:g}% entries by magnitude, from {st['samples']} sampled entries per module "
        f"(seed {st['seed']}{enumerated})."
    )

    t = Table(title="inputs", title_justify="left")
    for col in ("", "adapter", "modules", "ranks", "‖ΔW‖_F", "eff. rank (mean)"):
        t.add_column(col, justify="left" if col in ("", "adapter") else "right")
    for i, inp in enumerate(result["inputs"]):
        t.add_row(inp["label"], inp["name"], str(inp["modules"]), ",".join(map(str, inp["ranks"])),
                  _f(overall["norm"][i], ".4g"), _f(overall["effective_rank_mean"][i], ".2f"))
    console.print(t, soft_wrap=False)  # tables fit the width; prose soft-wraps

    if n_pairs:
        t = Table(title="pairs (all modules)", title_justify="left")
        for col in ("pair", "cosine", "sign conflict ± 95%", "subspace overlap L / R"):
            t.add_column(col, justify="left" if col == "pair" else "right")
        ov = overall["subspace_overlap_mean"]
        for p, lab in enumerate(plabels):
            t.add_row(lab, _cos(overall["cosine"][p]), _pct(overall["conflict"][p], True),
                      f"{_f(ov['left'][p])} / {_f(ov['right'][p])}")
        if len(labels) >= 3 and overall["conflict_all"]:
            t.add_row("all", "", _pct(overall["conflict_all"], True), "")
        console.print(t, soft_wrap=False)  # tables fit the width; prose soft-wraps
        console.print("energy of the sum / sum of energies: "
                      f"{_f(overall['energy_ratio'])} (1 = orthogonal deltas, > 1 reinforcing, < 1 cancelling)")

    for title, groups in (("per layer", result["layers"]), ("per module type", result["types"])):
        if not n_pairs:
            break
        t = Table(title=title, title_justify="left")
        t.add_column("layer" if title == "per layer" else "type")
        t.add_column("modules", justify="right")
        for h in _pair_headers(plabels, wide):
            t.add_column(h, justify="right")
        t.add_column("energy ratio", justify="right")
        for key, agg in groups.items():
            t.add_row(_short(key), str(agg["n_modules"]), *_pair_cells(agg, n_pairs, wide), _f(agg["energy_ratio"]))
        console.print(t, soft_wrap=False)  # tables fit the width; prose soft-wraps

    if not n_pairs and sort in ("conflict", "cosine"):
        sort = "norm"  # one input: nothing to compare, show the largest deltas first
    mods = sorted(result["modules"], key=lambda r: _score(r, sort))
    shown = mods if top <= 0 else mods[:top]
    order = {"conflict": "highest mean sign conflict first", "cosine": "lowest mean cosine first",
             "norm": "largest delta first", "name": "by name"}[sort]
    t = Table(title=f"modules ({order}; {len(shown)} of {len(mods)}{'' if len(shown) == len(mods) else ', --top 0 for all'})",
              title_justify="left")
    # the module name is what the table is about: it keeps its full width (q_proj and v_proj must stay apart) and
    # the number columns wrap instead; on a terminal too narrow even for that it folds, never ends in "…"
    longest = max((len(_short(r["name"])) for r in shown), default=6)
    t.add_column("module", width=min(longest, max(20, console.width - 70)), overflow="fold")
    t.add_column("shape", justify="right")
    t.add_column("‖ΔW‖_F " + "/".join(labels), justify="right", overflow="fold")
    if n_pairs:
        for h in _pair_headers(plabels, wide):
            t.add_column(h, justify="right")
    t.add_column("eff. rank " + "/".join(labels) + " → Σ", justify="right", overflow="fold")
    for r in shown:
        er = "/".join(_f(x, ".1f") for x in r["effective_rank"]) + f" → {_f(r['sum']['effective_rank'], '.1f')}"
        cells = _pair_cells(r, n_pairs, wide) if n_pairs else []
        t.add_row(_short(r["name"]), "x".join(map(str, r["shape"])), "/".join(_f(x, ".3g") for x in r["norm"]), *cells, er)
    console.print(t, soft_wrap=False)  # tables fit the width; prose soft-wraps

    pv = result.get("preview")
    if pv:
        agg = result["overall"].get("preview") or {}
        params = ", ".join(f"{k}={v[0] if isinstance(v, list) and len(set(v)) == 1 else v}" for k, v in pv["params"].items())
        sampled = f"{pv['modules_previewed']} of {pv['modules_total']} modules (seeded sample)" if pv["module_sample"] else f"all {pv['modules_total']} modules"
        t = Table(title=f"merge preview: {pv['method']}({params}), weights {','.join(f'{w:g}' for w in pv['weights'])}, "
                        f"rank {pv['rank'] if pv['rank'] is not None else 'default'}; {sampled}", title_justify="left")
        for col in ("input", "projection <M,D>/‖D‖²", "cos(M, D)", "‖M‖/‖D‖"):
            t.add_column(col, justify="left" if col == "input" else "right")
        for i, lab in enumerate(labels):
            t.add_row(lab, _f(agg.get("projection", [None] * len(labels))[i]), _cos(agg.get("cosine", [None] * len(labels))[i]),
                      _f(agg.get("norm_ratio", [None] * len(labels))[i]))
        console.print(t, soft_wrap=False)  # tables fit the width; prose soft-wraps
        console.print("projection 1 = the merge keeps all of that input's delta, 0 = none of it (see docs/diagnostics.md)")
    for note in result["notes"]:
        console.print(f"note: {note}", highlight=False)


# ------------------------------------------------------------------------------------------------ plot
def _layer_labels(keys: Sequence[str]) -> list[str]:
    prefixes = {k.rpartition(".")[0] for k in keys if k[-1:].isdigit()}
    if len(prefixes) == 1:
        return [k.rpartition(".")[2] if k[-1:].isdigit() else k for k in keys]
    return [_short(k) for k in keys]


def write_plot(result: dict[str, Any], path: Path) -> None:
    """Heatmaps: pairwise cosine of the whole deltas (inputs x inputs) and sign-conflict rate (layers x pairs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [i["label"] for i in result["inputs"]]
    n = len(labels)
    cm = [[math.nan if v is None else v for v in row] for row in result["cosine_matrix"]]
    layer_keys = list(result["layers"])
    cols = list(result["pair_labels"]) + (["all"] if n >= 3 else [])
    grid = []
    for k in layer_keys:
        agg = result["layers"][k]
        row = [math.nan if not c or c.get("rate") is None else c["rate"] for c in agg["conflict"]]
        if n >= 3:
            c = agg["conflict_all"]
            row.append(math.nan if not c or c.get("rate") is None else c["rate"])
        grid.append(row)
    height = max(3.2, 0.26 * len(layer_keys) + 1.6)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.5, height), gridspec_kw={"width_ratios": [1, 1]})
    im1 = ax1.imshow(cm, cmap="RdBu_r", vmin=-1, vmax=1)
    ax1.set_xticks(range(n), labels)
    ax1.set_yticks(range(n), labels)
    for a in range(n):
        for b in range(n):
            if not math.isnan(cm[a][b]):
                ax1.text(b, a, f"{cm[a][b] + 0.0:.2f}".replace("-0.00", "0.00"), ha="center", va="center", fontsize=9,
                         color="white" if abs(cm[a][b]) > 0.6 else "black")
    ax1.set_title("cosine of the whole deltas", fontsize=10)
    fig.colorbar(im1, ax=ax1, fraction=0.046, pad=0.04)
    if grid and cols:
        im2 = ax2.imshow(grid, cmap="magma_r", vmin=0, vmax=1, aspect="auto")
        ax2.set_xticks(range(len(cols)), cols)
        ax2.set_yticks(range(len(layer_keys)), _layer_labels(layer_keys), fontsize=8)
        ax2.set_ylabel("layer")
        if len(layer_keys) * len(cols) <= 200:
            for y, row in enumerate(grid):
                for x, v in enumerate(row):
                    if not math.isnan(v):
                        ax2.text(x, y, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                                 color="white" if v > 0.45 else "black")
        fig.colorbar(im2, ax=ax2, fraction=0.046, pad=0.04)
    else:
        ax2.axis("off")
    st = result["settings"]
    ax2.set_title(f"sign conflict (%) in top {100 * st['top_k_fraction']:g}% entries", fontsize=10)
    legend = "   ".join(f"{i['label']} = {Path(i['name']).name}" for i in result["inputs"])
    fig.suptitle(legend, fontsize=9)
    fig.tight_layout()
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".adaptermerge-plot-", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".").lower() or "png")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a picture is made to be shared
        os.replace(tmp, path)
        tmp = None
    except ValueError as e:
        raise ParameterError(f"--plot {path}: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise OutputError(f"{path}: cannot write the plot: {e.strerror or e}") from None
    finally:
        plt.close(fig)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ command
def analyze(
    inputs: list[str] = typer.Argument(..., help="Adapters to compare: PEFT adapter directories or .safetensors files.", show_default=False),
    json_out: bool = typer.Option(False, "--json", help="Print every number as JSON on stdout (no table)."),
    plot: Optional[Path] = typer.Option(None, "--plot",
        help="Write a picture (.png, .svg, .pdf, ...; replaced if it exists): pairwise cosine heatmap and per-layer sign conflicts (needs matplotlib)."),
    top_k_fraction: float = typer.Option(0.2, "--top-k-fraction", help="Entries that matter for sign conflicts: each delta's top fraction by magnitude, in (0, 1]."),
    samples: int = typer.Option(32768, "--samples", help="Entries sampled per module for the sign statistics (smaller modules are enumerated exactly)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the entry sample, the preview's module sample and the preview merge (as merge --seed)."),
    subspace_k: Optional[int] = typer.Option(None, "--subspace-k", help="Singular vectors compared for subspace overlap (default: the smaller rank of the pair)."),
    top: int = typer.Option(15, "--top", help="Modules listed in the table (0 = all)."),
    sort: str = typer.Option("conflict", "--sort", help="Module order: conflict (highest mean over pairs first), cosine (lowest mean first), norm (largest first) or name."),
    alpha: Optional[float] = typer.Option(None, help="lora_alpha for bare .safetensors inputs without it in their metadata."),
    preview_method: Optional[str] = typer.Option(None, "--preview-method", help="Preview a merge with this method (e.g. ties, dare_ties, linear): how much of each input it keeps."),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Preview: one weight per input, comma separated (default 1 each)."),
    density: Optional[str] = typer.Option(None, help="Preview: fraction of entries kept (one value, or one per input)."),
    majority_sign: Optional[str] = typer.Option(None, help="Preview: sign election, total or frequency."),
    scale: Optional[float] = typer.Option(None, "--scale", "--lambda", help="Preview: scale applied to the merged delta."),
    normalize: Optional[bool] = typer.Option(None, "--normalize/--no-normalize", help="Preview: normalization (see merge --help)."),
    rescale: Optional[bool] = typer.Option(None, "--rescale/--no-rescale", help="Preview: DARE/DELLA rescaling."),
    gamma: Optional[float] = typer.Option(None, help="Preview: breadcrumbs outlier fraction."),
    epsilon: Optional[float] = typer.Option(None, help="Preview: della keep-probability spread."),
    param: Optional[list[str]] = typer.Option(None, "--param", "-p", help="Preview: any operator parameter as NAME=VALUE (repeatable), e.g. -p space=core."),
    preview_rank: Optional[str] = typer.Option(None, "--preview-rank", help="Preview: output rank as merge --rank (default: largest input rank; 'full' = no truncation)."),
    preview_modules: Optional[int] = typer.Option(None, "--preview-modules", help="Preview only a seeded sample of this many modules (element-wise methods form dense deltas)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Diagnose adapters before merging them: norms, cosines, sign conflicts, spectra, merge preview.

    Per module, layer and type: the norm of each delta, the cosine and sign-conflict rate of every pair, effective ranks and spectra, subspace overlaps, and optionally a merge preview (how much of each input a method would keep). Computed from the LoRA factors, without dense deltas.

    Example: adaptermerge analyze a/ b/ c/ --preview-method ties --density 0.5 --plot diagnostics.png
    """
    if sort not in SORTS:
        raise ParameterError(f"--sort must be one of {', '.join(SORTS)}, got {sort!r}")
    if top < 0:
        raise ParameterError(f"--top must be >= 0, got {top}")
    spec = build_preview(
        preview_method, weights, preview_rank, preview_modules,
        {"density": density, "majority_sign": majority_sign, "scale": scale, "normalize": normalize,
         "rescale": rescale, "gamma": gamma, "epsilon": epsilon},
        param,
    )
    if plot is not None:
        _check_plot_target(plot)

    from .adapter import load_adapter
    from .diagnostics import analyze as run_analysis, check_options, check_preview

    check_options(len(inputs), top_k_fraction, samples, seed, subspace_k)
    if spec is not None:
        check_preview(spec, len(inputs), seed)  # every option is checked before any file is opened
    adapters = [load_adapter(p, alpha=alpha) if os.path.isfile(p) else load_adapter(p) for p in inputs]
    progress, bar = None, None
    if not (quiet or json_out) and _err.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("[bold]analyzing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("{task.description}"), console=_err, transient=True)
        task = bar.add_task("", total=None)

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=_short(name))

    kwargs = dict(top_k_fraction=top_k_fraction, samples=samples, seed=seed, subspace_k=subspace_k, preview=spec, progress=progress)
    if bar is not None:
        with bar:
            result = run_analysis(adapters, **kwargs)
    else:
        result = run_analysis(adapters, **kwargs)
    if plot is not None:
        write_plot(result, plot)
        result["plot"] = str(plot)
    if json_out:
        sys.stdout.write(json.dumps(result, allow_nan=False) + "\n")
        sys.stdout.flush()
        return
    console = _out
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:  # read per command, like other tools
        console = Console(soft_wrap=True, width=int(columns))
    elif not console.is_terminal:
        console = Console(soft_wrap=True, width=220)
    render(result, console, top=top, sort=sort)
    if plot is not None:
        console.print(f"plot written to {plot}")
