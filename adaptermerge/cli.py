"""The ``adaptermerge`` command line: merge, inspect, methods (and plugin commands such as ``weaverec``).

Every error is one line on stderr, ``error: <what, naming the file/tensor/parameter>``, with a documented exit code
(see :mod:`adaptermerge.errors`): 2 bad parameters, 3 bad input, 4 incompatible inputs, 5 output problems.
"""

from __future__ import annotations

import math
import os
import sys
import tomllib
import warnings
from pathlib import Path
from typing import Any, Optional

import typer

try:  # typer >= 0.16 vendors its own copy of click; its exceptions are the ones raised
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - older typer on the real click
    from click import exceptions as click_exc
from rich.console import Console
from rich.box import ROUNDED as ROUNDED_BOX
from rich.markup import escape as rich_escape
from rich.table import Table
from rich.text import Text

from .cliout import StdoutError, json_safe, plain, print_json, stdout_guard  # noqa: F401  (re-exported)
from .cliparse import floats as _floats, one_or_many, operator_params
from .errors import AdapterMergeError, InputError, ParameterError, cli_wording, printable, shorten

app = typer.Typer(
    name="adaptermerge",
    help="Merge LoRA adapters as adapters: exact, fast, reproducible, no base model needed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

CONFIG_KEYS = {
    "inputs", "method", "weights", "params", "rank", "seed", "svd", "svd_niter", "svd_oversample", "dtype",
    "output", "force", "extra_tensors", "allow_nonfinite", "allow_disjoint", "alpha", "warn_loss",
    # the format layer (--to, --for, --format, --base, --ignore-unknown, --gguf-arch)
    "to", "for", "format", "base", "ignore_unknown", "gguf_arch",
}
INPUT_KEYS = {"path", "weight", "alpha"}  # plus every per-input operator parameter (per_input_params())


def per_input_params() -> set[str]:
    """Names of the operator parameters that take one value per input (declared once, in the operators)."""
    from .registry import METHODS

    return {p.name for m in METHODS.values() for p in m.params if p.per_input}


# ------------------------------------------------------------------------------------------------ helpers
def _rank(value: Any) -> int | str | None:
    if value is None or value == "full":
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value))
    except ValueError:
        raise ParameterError(f"--rank must be a positive integer or 'full', got {value!r}") from None


def _yaml_loader():
    """PyYAML's safe loader without aliases: ``*name`` is refused while the document is composed, so an alias bomb
    (each level referring to the previous one nine times: 384 bytes, gigabytes once expanded) never expands."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(
                    None, None, f"YAML aliases (*{shorten(event.anchor, 40)[1:-1]}) are not allowed in adaptermerge configs",
                    event.start_mark)
            return super().compose_node(parent, index)

    return NoAliasLoader


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a merge config (.yaml/.yml, .toml or .json) into a plain dict and check its keys and value types.

    The file is read like every input: non-blocking open, regular files only, size-capped (a FIFO, ``/dev/zero``
    or a sparse 8 GiB file is refused); YAML without aliases; JSON without duplicate keys.
    """
    from .safetensors_io import DuplicateKeyError, has_lone_surrogate, read_small_text, strict_json

    if path.suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise InputError(f"{path}: config must be .yaml, .yml, .toml or .json")
    text = read_small_text(path, "config", limit=CONFIG_MAX_BYTES)
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass without aliases
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = strict_json(text)
    except DuplicateKeyError as e:
        raise InputError(f"{path}: key {shorten(e.key, 200)} appears twice") from None
    except Exception as e:  # parser errors of three libraries (RecursionError included)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"{path}: cannot parse config: {shorten(first, 200)[1:-1]}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: config must be a mapping of options")
    if has_lone_surrogate(data):
        raise InputError(f"{path}: holds a lone surrogate (\\ud800-\\udfff): not valid text")
    unknown = [k for k in data if k not in CONFIG_KEYS]
    if unknown:
        raise ParameterError(f"{path}: unknown config keys {shorten(sorted(map(str, unknown)), 200)} (valid: {sorted(CONFIG_KEYS)})")
    _check_config_types(data, path)
    return data


#: The largest --config file read (a recipe is a few hundred bytes; a long list of inputs a few KB).
CONFIG_MAX_BYTES = 1024 * 1024


def _is_number(v: Any) -> bool:
    """A number a recipe may give: not a bool, finite, and an integer only up to 2^53 (exact as a float; 10**400
    would overflow every float conversion downstream)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return abs(v) <= 2**53 if isinstance(v, int) else math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and abs(v) <= 2**63


def _config_type_error(path: Path, key: str, want: str, v: Any) -> ParameterError:
    return ParameterError(f"{path}: config {key} must be {want}, got {shorten(v)} ({type(v).__name__})")


def _check_config_types(cfg: dict[str, Any], path: Path) -> None:
    """Every config value has the type the option takes: YAML/TOML/JSON give real booleans, numbers, strings and
    lists, so ``"false"`` (a string, i.e. true) is refused instead of replacing an output or letting NaN through."""
    want: dict[str, tuple[str, Any]] = {
        "method": ("a string", lambda v: isinstance(v, str)),
        "output": ("a string (a path)", lambda v: isinstance(v, str) and v != ""),
        "svd": ("a string", lambda v: isinstance(v, str)),
        "dtype": ("a string", lambda v: isinstance(v, str)),
        "extra_tensors": ("a string", lambda v: isinstance(v, str)),
        "force": ("true or false", lambda v: isinstance(v, bool)),
        "allow_nonfinite": ("true or false", lambda v: isinstance(v, bool)),
        "allow_disjoint": ("true or false", lambda v: isinstance(v, bool)),
        "ignore_unknown": ("true or false", lambda v: isinstance(v, bool)),
        "to": ("a string", lambda v: isinstance(v, str)),
        "for": ("a string", lambda v: isinstance(v, str)),
        "format": ("a string", lambda v: isinstance(v, str)),
        "gguf_arch": ("a string", lambda v: isinstance(v, str)),
        "base": ("a string (a path)", lambda v: isinstance(v, str) and v != ""),
        "seed": ("an integer", _is_int),
        "svd_niter": ("an integer", _is_int),
        "svd_oversample": ("an integer", _is_int),
        "rank": ("a positive integer or 'full'", lambda v: v == "full" or _is_int(v)),
        "alpha": ("a finite number", _is_number),
        "warn_loss": ("a finite number", _is_number),
        "weights": ("a list of numbers", lambda v: isinstance(v, list) and all(_is_number(x) for x in v)),
        "params": ("a mapping of parameter names to values", lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v)),
        "inputs": ("a list of paths or of mappings with 'path'", lambda v: isinstance(v, list)),
    }
    for key, v in cfg.items():
        if v is None:
            continue  # the same as leaving the key out
        what, ok = want[key]
        if not ok(v):
            raise _config_type_error(path, key, what, v)
    for name, v in (cfg.get("params") or {}).items():
        flat = v if isinstance(v, list) else [v]
        if not all(isinstance(x, (bool, str)) or _is_number(x) for x in flat):
            raise _config_type_error(path, f"params.{shorten(name, 40)[1:-1]}", "a finite number, a string, true/false or a list of numbers", v)
    for i, item in enumerate(cfg.get("inputs") or []):
        if isinstance(item, str):
            continue
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise _config_type_error(path, f"inputs[{i}]", "a path (a string) or a mapping with 'path' (a string)", item)
        for k, v in item.items():  # weight, alpha and every per-input operator parameter (declared in the operators)
            if k == "path" or v is None:
                continue
            if k in ("weight", "alpha") and not _is_number(v):
                raise _config_type_error(path, f"inputs[{i}].{shorten(k, 40)[1:-1]}", "a finite number", v)
            if not (isinstance(v, (bool, str)) or _is_number(v)):
                raise _config_type_error(path, f"inputs[{i}].{shorten(k, 40)[1:-1]}", "a finite number, a string or true/false", v)


def _expand_inputs(cfg: dict[str, Any], base: Path) -> tuple[list[str], list[float] | None, dict[str, list[Any]], list[float | None]]:
    """Paths, weights, per-input operator parameters ({name: one value per input}) and alphas of a config."""
    per_input = per_input_params()
    valid = INPUT_KEYS | per_input
    paths, weights, alphas = [], [], []
    values: dict[str, list[Any]] = {k: [] for k in sorted(per_input)}
    for i, item in enumerate(cfg.get("inputs") or []):
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict) or "path" not in item:
            raise ParameterError(f"config inputs[{i}] must be a path or a mapping with 'path'")
        unknown = set(item) - valid
        if unknown:
            raise ParameterError(f"config inputs[{i}]: unknown keys {shorten(sorted(map(str, unknown)), 200)} (valid: {sorted(valid)})")
        p = Path(str(item["path"]))
        paths.append(str(p if p.is_absolute() else base / p))
        weights.append(item.get("weight"))
        for k in values:
            values[k].append(item.get(k))
        alphas.append(item.get("alpha"))
    w = None if all(x is None for x in weights) else weights
    if w is not None and any(x is None for x in w):
        raise ParameterError("config: give a weight for every input or for none")
    params = {}
    for k, vals in values.items():
        if all(x is None for x in vals):
            continue
        if any(x is None for x in vals):
            raise ParameterError(f"config: give a {k} for every input or for none")
        params[k] = vals
    return paths, w, params, alphas


def _widen(console: Console) -> None:
    """Fit the terminal: $COLUMNS when set (read at each command, like other tools), else the terminal's width;
    piped or captured output without $COLUMNS is not squeezed to 80 columns."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        console.width = int(columns)
    elif not console.is_terminal:
        console.width = 200


def _progress_bar(enabled: bool):
    """A rich progress bar on stderr as an engine progress callback (None when disabled)."""
    if not enabled or not err.is_terminal:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("[bold]merging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        TextColumn("{task.description}"), console=err, transient=True,
    )
    task = None

    def update(done: int, total: int, name: str) -> None:
        nonlocal task
        if task is None:
            task = bar.add_task("", total=total)
        # a module name from a file: escaped, so that '[/x]' in it is shown, not parsed as markup
        bar.update(task, completed=done, description=rich_escape(printable(name.removeprefix("base_model.model."))))

    return bar, update


# ------------------------------------------------------------------------------------------------ merge
# Options that several commands share, with one help text.
BASE_MODEL = typer.Option(None, "--base", help="Base model (safetensors file, index, or model/pipeline folder): module names for kohya files, head counts for GGUF.")
GGUF_ARCH = typer.Option(None, "--gguf-arch", help="general.architecture of a GGUF output (default: the input's, else llama).")
FORCE = typer.Option(False, "--force", "-f", help="Replace an existing output.")


@app.command()
def merge(
    inputs: Optional[list[str]] = typer.Argument(None, help="Adapters to merge: PEFT adapter directories or .safetensors files.", show_default=False),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output: a directory (PEFT adapter) or a file ending in .safetensors."),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="Merge operator (default linear). `adaptermerge methods` lists them with their parameters."),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="One weight per input, comma separated, e.g. 0.5,0.3,0.2 (default 1 each)."),
    density: Optional[str] = typer.Option(None, help="Fraction of entries kept (ties, dare_*, magnitude_prune, breadcrumbs, della): one value, or one per input."),
    majority_sign: Optional[str] = typer.Option(None, help="Sign election for ties/dare_ties/della: total (sum of values) or frequency (count of signs)."),
    scale: Optional[float] = typer.Option(None, "--scale", "--lambda", help="Scale (the papers' lambda) applied to the merged delta."),
    normalize: Optional[bool] = typer.Option(None, "--normalize/--no-normalize", help="linear: divide by the sum of weights; ties-like: divide by the weights of agreeing inputs."),
    rescale: Optional[bool] = typer.Option(None, "--rescale/--no-rescale", help="DARE/DELLA: rescale kept entries by 1/keep-probability."),
    gamma: Optional[float] = typer.Option(None, help="breadcrumbs: fraction of the largest-magnitude entries dropped as outliers."),
    epsilon: Optional[float] = typer.Option(None, help="della: spread of keep probabilities around density."),
    space: Optional[str] = typer.Option(None, help="Element-wise methods: full (dense deltas, default) or core (Core Space: on the inputs' small core matrices, exact low-rank result)."),
    param: Optional[list[str]] = typer.Option(None, "--param", "-p", help="Any operator parameter as NAME=VALUE (repeatable), e.g. -p density=0.5 -p space=core; `adaptermerge methods` lists them."),
    rank: Optional[str] = typer.Option(None, "--rank", "-r",
        help="Output rank: an integer, or 'full' for an exact full-rank delta. Default: exact wherever the merged delta "
             "is low-rank (linear and factor-form methods, space=core), else the largest input rank. Not for cat."),
    warn_loss: Optional[float] = typer.Option(None, help="Warn when truncating loses more than this fraction of a module's merged delta (default 0.1; 1 = never)."),
    seed: Optional[int] = typer.Option(None, help="Seed for DARE/DELLA drops and the randomized SVD (default 0). Same seed, same bytes."),
    svd: Optional[str] = typer.Option(None, help="Back-to-low-rank for element-wise methods: randomized (fast, default) or exact."),
    svd_niter: Optional[int] = typer.Option(None, help="Power iterations of the randomized SVD (default 2)."),
    svd_oversample: Optional[int] = typer.Option(None, help="Extra sketch columns of the randomized SVD (default 8)."),
    dtype: Optional[str] = typer.Option(None, help="Output dtype: float32, bfloat16 or float16 (default: the inputs' dtype)."),
    alpha: Optional[float] = typer.Option(None, help="lora_alpha for bare .safetensors inputs without it in their metadata."),
    extra_tensors: Optional[str] = typer.Option(None,
        help="Non-LoRA tensors (modules_to_save, ...): identical (default: copy only if identical in all inputs, else error) or first (copy from the first input)."),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="Merge inputs that contain NaN/Inf instead of refusing them."),
    allow_disjoint: bool = typer.Option(False, "--allow-disjoint", help="Accept an input that shares no module with the others (refused by default: usually adapters of different models)."),
    force: bool = FORCE,
    to: Optional[str] = typer.Option(None, "--to", help="Output format: peft, kohya, diffusers or gguf (default: from the output name; a .safetensors output of kohya/diffusers inputs keeps their format)."),
    for_: Optional[str] = typer.Option(None, "--for", help="Export profile: vllm (PEFT, one rank from vLLM's accepted set, scale folded) or llama.cpp (GGUF)."),
    in_format: Optional[str] = typer.Option(None, "--format", help="Force the input format (peft, kohya, lycoris, diffusers, gguf) instead of detecting it."),
    base_model: Optional[Path] = BASE_MODEL,
    ignore_unknown: bool = typer.Option(False, "--ignore-unknown", help="Load inputs with unrecognised keys (they are listed) instead of refusing them."),
    gguf_arch: Optional[str] = GGUF_ARCH,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A YAML/TOML/JSON file with the same options (inputs with per-input weight/density/alpha, method, params, ...). Command-line options override it."),
    json_out: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary table."),
) -> None:
    """Merge LoRA adapters into one LoRA adapter (a PEFT directory, or one .safetensors file).

    Element-wise methods act on each module's delta scale*B@A (never on A and B separately) and are truncated back to low rank with a seeded randomized SVD, or run exactly in Core Space with -p space=core; linear and SVD-family methods (tsv_m, iso_c, iso_cts, knots) are computed exactly in low-rank form, at the sum of the input ranks by default.

    A folder output also gets a README.md that tells in words what was merged, how, and how faithful the result is. Inputs that share no module with the others are refused unless --allow-disjoint.

    Example: adaptermerge merge a/ b/ c.safetensors --method ties --weights 0.5,0.3,0.2 --density 0.5 --rank 16 -o merged/
    """  # help paragraphs are one line each: the help renderer keeps line breaks, so a wrapped source line would break mid-sentence
    from . import formats_cli
    from .engine import DEFAULT_WARN_LOSS, MergeLossWarning, MergeRequest, merge_to, retain_freed_memory

    cfg: dict[str, Any] = load_config_file(config) if config else {}
    base = config.parent if config else Path(".")
    cfg_paths, cfg_weights, cfg_per_input, cfg_alphas = _expand_inputs(cfg, base)
    paths = list(inputs or []) or cfg_paths
    if not paths:
        raise ParameterError("no inputs: give adapter paths or a --config with inputs")
    if inputs and cfg_paths:
        cfg_weights, cfg_per_input, cfg_alphas = None, {}, []
    w = _floats(weights, "--weights") if weights is not None else cfg_weights if cfg_weights is not None else cfg.get("weights")
    method_name = method or cfg.get("method", "linear")
    params: dict[str, Any] = dict(cfg.get("params") or {})
    params.update(cfg_per_input)
    flags = {"density": None if density is None else one_or_many(_floats(density, "--density")),
             "majority_sign": majority_sign, "scale": scale, "normalize": normalize, "rescale": rescale,
             "gamma": gamma, "epsilon": epsilon, "space": space}
    params.update(operator_params(method_name, param, flags))
    opts = {
        "rank": _rank(rank if rank is not None else cfg.get("rank")),
        "seed": seed if seed is not None else cfg.get("seed", 0),
        "svd": svd or cfg.get("svd", "randomized"),
        "svd_niter": svd_niter if svd_niter is not None else cfg.get("svd_niter", 2),
        "svd_oversample": svd_oversample if svd_oversample is not None else cfg.get("svd_oversample", 8),
        "dtype": dtype or cfg.get("dtype"),
        "extra_tensors": extra_tensors or cfg.get("extra_tensors", "identical"),
        "warn_loss": warn_loss if warn_loss is not None else cfg.get("warn_loss", DEFAULT_WARN_LOSS),
        "allow_disjoint": allow_disjoint or cfg.get("allow_disjoint") is True,
    }
    # 1. every option, once, before any file is opened
    request = MergeRequest.build(method_name, len(paths), w, params, **opts)
    target = output if output is not None else (base / str(cfg["output"]) if cfg.get("output") else None)
    if target is None:
        raise ParameterError("no output: pass -o/--output (a directory, or a file ending in .safetensors)")
    force = force or cfg.get("force") is True
    cfg_base = base / str(cfg["base"]) if cfg.get("base") else None  # relative to the config, as inputs and output
    fmt_opts = formats_cli.FormatOptions(to or cfg.get("to"), for_ or cfg.get("for"), in_format or cfg.get("format"),
                                         base_model or cfg_base, ignore_unknown or cfg.get("ignore_unknown") is True,
                                         gguf_arch or cfg.get("gguf_arch"))
    fmt_opts.check_output(target, force=force, inputs=[Path(p) for p in paths])
    # 2. headers of every input (no tensor data yet), in any format, mapped to one module naming
    default_alpha = alpha if alpha is not None else cfg.get("alpha")
    alphas = [(cfg_alphas[i] if i < len(cfg_alphas) and cfg_alphas[i] is not None else default_alpha) for i in range(len(paths))]
    adapters = fmt_opts.load_inputs(paths, alphas)
    # 3. merge, streaming to a temporary output renamed into place at the end (other formats: through a sink)
    retain_freed_memory()  # this process ends after the merge: reuse freed deltas instead of faulting pages in
    bar, update = _progress_bar(not (quiet or json_out))
    nonfinite = allow_nonfinite or cfg.get("allow_nonfinite") is True

    def run(progress):
        if fmt_opts.needs_sink(target, adapters):
            return fmt_opts.merge_and_save(target, adapters, request, None, force=force, allow_nonfinite=nonfinite,
                                           progress=progress)
        return merge_to(target, adapters, request, force=force, allow_nonfinite=nonfinite, progress=progress)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MergeLossWarning)  # printed below, from the summary
        if bar is not None:
            with bar:
                summary = run(update)
        else:
            summary = run(None)
    summary["output"] = str(target)
    formats_cli.add_input_reports(summary, adapters)
    if json_out:
        print_json(summary, done=f" (the merged adapter was written to {target})")
    elif not quiet:
        _print_merge_summary(summary)
        for note in summary.get("output_notes", []):
            err.print(plain(f"note: {note}"), highlight=False)
    for w in summary["warnings"]:
        err.print(plain(f"warning: {w}"), highlight=False)


def _print_merge_summary(s: dict[str, Any]) -> None:
    # everything that comes from a file or the command line is plain text (plain()), never markup
    t = Table(title=plain(f"merged with {s['method']} -> {s['output']}"), show_lines=False)
    for col in ("input", "weight", "modules", "ranks", "dtype"):
        t.add_column(col)
    for inp, w in zip(s["inputs"], s["weights"]):
        t.add_row(plain(inp["name"]), f"{w:g}", str(inp["modules"]), ",".join(map(str, inp["ranks"])), plain(inp["dtype"]))
    say = lambda text: err.print(plain(text), highlight=False)  # noqa: E731
    err.print(t, soft_wrap=False)
    ranks = sorted({m["rank"] for m in s["modules"].values()})
    say(
        f"{s['n_modules']} modules, output rank {','.join(map(str, ranks))}, dtype {s['output_dtype']}; "
        f"relative truncation error max {s['max_rel_error']:.3g}, mean {s['mean_rel_error']:.3g}; {s['seconds']:.2f} s"
    )
    for inp in s["inputs"]:
        for note in inp["notes"]:
            say(f"note: {inp['name']}: {note}")
    missing = [n for n in s["notes"] if "missing" in n]
    if missing:
        say(f"note: {len(missing)} module(s) missing from some inputs were treated as zero deltas there, e.g. {missing[0]}")
    for k, why in s["extra_tensors"].items():
        say(f"note: non-LoRA tensor {k}: {why}")


# ------------------------------------------------------------------------------------------------ inspect
@app.command()
def inspect(
    path: Path = typer.Argument(..., help="A LoRA: PEFT adapter directory, or a PEFT/kohya/LyCORIS/diffusers .safetensors or GGUF file."),
    alpha: Optional[float] = typer.Option(None, help="lora_alpha for a bare .safetensors file without it in its metadata."),
    in_format: Optional[str] = typer.Option(None, "--format", help="Force the format (peft, kohya, lycoris, diffusers, gguf) instead of detecting it."),
    base_model: Optional[Path] = BASE_MODEL,
    ignore_unknown: bool = typer.Option(False, "--ignore-unknown", help="Open a file with unrecognised keys (they are listed) instead of refusing it."),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON on stdout."),
) -> None:
    """Show a LoRA's format (detected), modules, shapes, ranks, alpha/scale per module, dtype, delta norms, key
    coverage and provenance."""
    from . import formats
    from .lowrank import delta_norm
    from .safetensors_io import gib, memory_limit_bytes

    a = formats.load(path, alpha=alpha, require_alpha=False, format=in_format, base=base_model, ignore_unknown=ignore_unknown)
    rows = []
    limit = memory_limit_bytes()
    for m in sorted(a.modules.values(), key=lambda m: natural_key(m.name)):  # layers 0, 1, 2, ..., 10, not 0, 1, 10
        # the factors as read, scaled float32 copies, and delta_norm's float64 copies: checked before reading
        need = (m.out_features + m.in_features) * m.rank * ({"F64": 8, "F32": 4}.get(m.dtype, 2) + 4 + 16)
        if need > limit:
            raise InputError(f"{a.name}: module {shorten(m.name, 200)} needs about {gib(need)} of memory to inspect, "
                             f"more than the {gib(limit)} this process can have")
        try:
            b, aa = a.factors(m.name, check_finite=False)
            norm = delta_norm(b, aa)
        except MemoryError:
            raise InputError(f"{a.name}: module {shorten(m.name, 200)}: out of memory while reading it") from None
        del b, aa
        rows.append({
            "module": m.name, "kind": m.kind, "shape": list(m.shape), "rank": m.rank, "alpha": m.alpha,
            "scale": m.scale, "dtype": m.dtype, "delta_norm": norm,
            "kernel": list(a.layout[m.name]) if m.name in a.layout else None,
        })
    info = {
        "path": str(path), "weights_file": str(a.weights_file), "sha256": a.sha256(), "n_modules": len(rows),
        "config": {k: a.config.get(k) for k in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules", "base_model_name_or_path") if k in a.config},
        "extra_tensors": sorted(a.extras), "provenance": a.metadata, "notes": a.notes, "modules": rows,
        "format": a.coverage.as_dict(),
    }
    if json_out:
        print_json(info)
        return
    _widen(out)
    # everything that comes from the file is plain text (plain()), never markup, never raw control characters
    t = Table(title=plain(f"{path}  ({len(rows)} modules, sha256 {info['sha256'][:12]}…)"))
    longest = max((len(r["module"].removeprefix("base_model.model.")) for r in rows), default=6)
    for col in ("module", "kind", "shape", "rank", "alpha", "scale", "dtype", "‖ΔW‖_F"):
        if col == "module":  # whole names (q_proj vs v_proj), folded rather than cut on a very narrow terminal
            t.add_column(col, width=min(longest, max(20, out.width - 60)), overflow="fold")
        else:
            t.add_column(col, justify="right" if col not in ("kind", "dtype") else "left", overflow="fold")
    for r in rows:
        t.add_row(plain(r["module"].removeprefix("base_model.model.")), r["kind"] if not r["kernel"] else "conv{}x{}".format(*r["kernel"]), "x".join(map(str, r["shape"])), str(r["rank"]),
                  f"{r['alpha']:g}", f"{r['scale']:.4g}", r["dtype"], f"{r['delta_norm']:.4g}")
    with stdout_guard():
        out.print(t, soft_wrap=False)
        say = lambda text: out.print(plain(text), highlight=False)  # noqa: E731
        cov = info["format"]
        say(f"format: {cov['format']} (detected by {cov['detected_by']}); module names: {cov['mapping']}; "
            f"keys: {cov['recognised_keys']} recognised, {len(cov['unrecognised_keys'])} not")
        say("config: " + ", ".join(f"{k}={shorten(v, 300) if not isinstance(v, str) else v[:300]}" for k, v in info["config"].items()))
        if a.extras:
            say(f"non-LoRA tensors: {', '.join(sorted(a.extras))}")
        for k, v in sorted(a.metadata.items()):
            say(f"metadata {k}: {v if len(v) < 300 else v[:300] + '…'}")
        for n in a.notes:
            if not n.startswith("format "):  # (shown in the format line above)
                say(f"note: {n}")

# ------------------------------------------------------------------------------------------------ convert
@app.command()
def convert(
    path: Path = typer.Argument(..., help="A LoRA in any supported format (PEFT folder/file, kohya, LyCORIS, diffusers, GGUF)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output: a folder (PEFT) or a file (.safetensors, .gguf)."),
    to: Optional[str] = typer.Option(None, "--to", help="peft, kohya, diffusers or gguf (default: from the output name)."),
    for_: Optional[str] = typer.Option(None, "--for", help="Export profile: vllm or llama.cpp."),
    in_format: Optional[str] = typer.Option(None, "--format", help="Force the input format instead of detecting it."),
    base_model: Optional[Path] = BASE_MODEL,
    ignore_unknown: bool = typer.Option(False, "--ignore-unknown", help="Convert a file with unrecognised keys (they are listed and dropped) instead of refusing it."),
    gguf_arch: Optional[str] = GGUF_ARCH,
    dtype: Optional[str] = typer.Option(None, help="Output dtype: float32, bfloat16 or float16 (default: the input's)."),
    alpha: Optional[float] = typer.Option(None, help="lora_alpha for a bare PEFT .safetensors input without it in its metadata."),
    force: bool = FORCE,
    json_out: bool = typer.Option(False, "--json", help="Print a machine-readable report on stdout."),
) -> None:
    """Convert a LoRA between formats; the written file applies exactly the same delta (scale folded into the factors).

    Example: adaptermerge convert lora.safetensors --to peft -o adapter/
    """
    from . import formats_cli

    report = formats_cli.convert(path, output, to=to, profile=for_, in_format=in_format, base=base_model,
                                 ignore_unknown=ignore_unknown, gguf_arch=gguf_arch, dtype=dtype, alpha=alpha, force=force)
    if json_out:
        print_json(report, done=f" (the converted LoRA was written to {output})")
        return
    cov = report["input"]
    say = lambda text: err.print(plain(text), highlight=False)  # noqa: E731  (file-derived text: never markup)
    say(f"{path}: format {cov['format']} (detected by {cov['detected_by']}); module names: {cov['mapping']}; "
        f"{cov['recognised_keys']} keys recognised, {len(cov['unrecognised_keys'])} not")
    for n in report["notes"]:
        say(f"note: {n}")
    say(f"wrote {report['output']['format']} -> {output} ({report['modules']} modules)")


# ------------------------------------------------------------------------------------------------ methods
@app.command()
def methods(json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")) -> None:
    """List every merge operator with its parameters (defaults, ranges) and its paper."""
    from .registry import describe

    info = describe()
    if json_out:
        print_json(info)
        return
    _widen(out)
    with stdout_guard():
        render_methods(info, out)


def render_methods(info: list[dict[str, Any]], console: Console) -> None:
    """The methods as a two-column table that fits ``console.width`` (>= 60 columns): the name and form on the left;
    on the right what the method does, its parameters one per line, and each paper with its link (and reference
    code) on a line of its own. Text wraps at spaces and long words fold, so nothing is cut off with an ellipsis."""
    from rich.markup import escape
    from rich.text import Text

    name_width = max(len(m["name"]) for m in info) if info else 6
    width = min(console.width, 120)
    t = Table(show_lines=True, width=width, box=None if width < 60 else ROUNDED_BOX, padding=(0, 1))
    t.add_column("method", no_wrap=True, min_width=name_width, max_width=name_width)
    t.add_column("what it does · parameters (default, allowed) · paper", overflow="fold", ratio=1)
    for m in info:
        lines = [escape(m["summary"])]
        for p in m["params"]:
            rng = p.get("choices") or p.get("range")
            lines.append(f"  [cyan]{escape(p['name'])}[/]={escape(repr(p['default']))}" + (f" {escape(str(rng))}" if rng else "")
                         + (" (one per input allowed)" if p.get("per_input") else ""))
        for paper in m["papers"]:
            lines.append(f"[dim]{escape(paper['citation'])}[/]")
            code = f" · code: github.com/{paper['repo']}" if paper["repo"] else ""
            lines.append(f"[dim]{escape(paper['url'] + code)}[/]")
        t.add_row(Text.assemble((m["name"], "bold"), "\n", (m["form"], "dim")), "\n".join(lines))
    console.print(t, soft_wrap=False)


# ------------------------------------------------------------------------------------------------ analyze
from .analyze_cli import analyze as _analyze, natural_key  # noqa: E402  (typer/rich/stdlib only at import time)

app.command(name="analyze")(_analyze)


# ------------------------------------------------------------------------------------------------ plugins + main
_plugins_loaded = False


def _load_plugins() -> None:
    """Register the plugin commands once per process (main() may be called many times, e.g. by tests; adding them
    again each time made every call slower than the last)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="adaptermerge.plugins"):
        try:
            sub = ep.load()
        except Exception as e:  # a broken plugin must not break the core commands
            msg = f"plugin '{ep.name}' could not be loaded: {type(e).__name__}: {e}"

            def broken(_msg: str = msg) -> None:
                raise AdapterMergeError(_msg)

            app.command(name=ep.name, help=f"(unavailable) {msg}")(broken)
            continue
        app.add_typer(sub, name=ep.name)


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the CLI, turns every error into one line on stderr and an exit code."""
    _load_plugins()
    cmd = typer.main.get_command(app)
    try:
        with cli_wording():  # messages name options as flags (--force), not keyword arguments (force=True)
            rv = cmd.main(args=argv, prog_name="adaptermerge", standalone_mode=False)
    except AdapterMergeError as e:
        _error_line(str(e))
        return e.exit_code
    except typer.Exit as e:
        return _exit_status(e.exit_code)
    except typer.Abort:
        _error_line("aborted")
        return 130
    except KeyboardInterrupt:  # outside typer's own handler (e.g. while loading plugins)
        return _exit_status(130)
    except click_exc.NoArgsIsHelpError:
        return 2  # the help text has been printed
    except click_exc.UsageError as e:
        where = f"{e.ctx.command_path}: " if e.ctx else ""
        _error_line(f"{where}{e.format_message()}")
        return 2
    except click_exc.ClickException as e:
        _error_line(e.format_message())
        return e.exit_code
    # typer returns the status of an ``Exit`` it raised itself: 130 for Ctrl-C (KeyboardInterrupt), which must
    # reach the shell (``merge && upload`` must not go on)
    return _exit_status(rv) if isinstance(rv, int) and not isinstance(rv, bool) else 0


def _exit_status(code: int) -> int:
    if code == 130:
        _error_line("interrupted (Ctrl-C)")
    return code


def _error_line(message: str) -> None:
    """``error: <message>`` on stderr, one printable line; a failing stderr is ignored (the exit code remains)."""
    try:
        err.print(Text(f"error: {printable(message)}"), highlight=False, soft_wrap=True)
    except OSError:
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
