"""The README.md written into a merged adapter folder: what was merged, how, and how faithful the result is.

PEFT writes a model card into every adapter folder it saves; a merged adapter deserves one too, in words a person
reads. Everything in it comes from the provenance already stored in the safetensors metadata (method, settings,
inputs and their hashes, per-module truncation errors) and from adapter_config.json, so the card adds no
information that could disagree with the weights, and the weights file is the same with or without it. It is
deterministic: no dates, no host names, so the same merge gives the same folder byte for byte.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

CARD_NAME = "README.md"
EXACT = 1e-6  # a relative truncation error below this is float32 rounding, not truncation


def _load(metadata: Mapping[str, str], key: str, default: Any) -> Any:
    try:
        return json.loads(metadata[key])
    except (KeyError, ValueError, TypeError):
        return default


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _value(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(_num(x) for x in v) if len(set(map(str, v))) > 1 else _num(v[0])
    return _num(v)


#: Operator parameters with a flag of their own on the command line; every other one is written -p NAME=VALUE.
_FLAGS = {"density", "majority_sign", "scale", "normalize", "rescale", "gamma", "epsilon", "space"}


def _cli_flags(settings: Mapping[str, Any]) -> list[str]:
    """The command-line options that repeat the merge (method, weights, parameters, rank, seed, dtype)."""
    flags = [f"--method {settings.get('method')}"]
    if settings.get("weights"):
        flags.append("--weights " + ",".join(_num(float(w)) for w in settings["weights"]))
    for k, v in sorted((settings.get("params") or {}).items()):
        opt = "--" + k.replace("_", "-")
        if v is None:
            continue
        if k not in _FLAGS:
            flags.append(f"-p {k}={str(v).lower() if isinstance(v, bool) else _value(v)}")
        elif isinstance(v, bool):
            flags.append(opt if v else f"--no-{k.replace('_', '-')}")
        else:
            flags.append(f"{opt} {_value(v)}")
    if settings.get("rank") is not None:
        flags.append(f"--rank {settings['rank']}")
    flags.append(f"--seed {settings.get('seed', 0)}")
    if settings.get("svd") == "exact":
        flags.append("--svd exact")
    elif settings.get("svd"):
        flags += [f"--svd-{k} {settings[f'svd_{k}']}" for k, d in (("niter", 2), ("oversample", 8)) if settings.get(f"svd_{k}", d) != d]
    if settings.get("dtype"):
        flags.append(f"--dtype {settings['dtype']}")
    return flags


def model_card(metadata: Mapping[str, str], config: Mapping[str, Any] | None) -> str | None:
    """The card's text for an adaptermerge output, or None when the metadata holds no merge provenance."""
    method_name = metadata.get("adaptermerge.method")
    if not method_name:
        return None
    from .registry import METHODS

    settings = _load(metadata, "adaptermerge.settings", {})
    inputs = _load(metadata, "adaptermerge.inputs", [])
    errors = {k: float(v) for k, v in _load(metadata, "adaptermerge.rel_errors", {}).items()}
    method = METHODS.get(method_name)
    weights = settings.get("weights") or [1.0] * len(inputs)
    config = dict(config or {})
    base = config.get("base_model_name_or_path")

    out = ["---", "library_name: peft", "tags:", "- lora", "- adaptermerge", f"- {method_name}"]
    if base:
        out.append(f"base_model: {base}")
    out += ["---", "", "# Merged LoRA adapter", ""]
    what = f"**{method_name}**" + (f": {method.summary}" if method else "")
    out.append(f"This LoRA adapter is the merge of {len(inputs)} adapter{'s' if len(inputs) != 1 else ''} with {what}. "
               f"It was made by adaptermerge {metadata.get('adaptermerge.version', '')}, which merges adapters as "
               "adapters (from their LoRA factors, without the base model).".replace(" ,", ","))
    if method:
        out += ["", f"Method reference: {method.paper}."]

    out += ["", "## Inputs", "", "| # | adapter | weight | sha256 of the tensors and metadata |", "|---|---|---|---|"]
    for i, (inp, w) in enumerate(zip(inputs, weights), start=1):
        out.append(f"| {i} | `{inp.get('name')}` | {_num(float(w))} | `{inp.get('sha256')}` |")

    out += ["", "## Settings", ""]
    params = settings.get("params") or {}
    if params:
        out.append("Parameters: " + ", ".join(f"{k} = {_value(v)}" for k, v in sorted(params.items())) + ".")
    rank = settings.get("rank")
    low_rank = method is not None and (method.form != "dense" or params.get("space") == "core")  # exactly low-rank
    out.append("Output rank: " + ("the sum of the input ranks (an exact concatenation)" if method and method.concat else
                                  "the sum of the input ranks, capped by each module's size (exact: the merge itself)"
                                  if low_rank and rank in (None, "full") else
                                  "full (an exact full-rank delta)" if rank == "full" else
                                  f"{config.get('r', '?')} (the largest input rank)" if rank is None else str(rank))
               + (f"; seed {settings.get('seed', 0)}" if method and method.stochastic or settings.get("svd") else "")
               + (f"; back to low rank by a {settings['svd']} SVD" if settings.get("svd") else "")
               + f"; stored as {settings.get('dtype', 'float32')}.")
    out.append("The LoRA scale is folded into `lora_B`, so `adapter_config.json` says `lora_alpha` = `r` for every module.")

    out += ["", "## How faithful the adapter is to the merge", ""]
    if errors:
        worst = max(errors, key=lambda k: errors[k])
        exact = sum(1 for v in errors.values() if v < EXACT)
        mean = math.fsum(errors.values()) / len(errors)
        short = worst.removeprefix("base_model.model.")
        out.append(f"{len(errors)} modules. For each, the relative truncation error is the part of the merged delta that "
                   "the stored low-rank factors do not reproduce, ‖merged − stored‖ / ‖merged‖ (Frobenius norm): "
                   "0 means the adapter is exactly the merge.")
        if exact == len(errors):
            out.append("")
            out.append("Every module is exact (error below 1e-6, float32 rounding).")
        else:
            out += ["", f"- exact (error below 1e-6): {exact} of {len(errors)} modules",
                    f"- mean error: {mean:.3g}",
                    f"- largest error: {errors[worst]:.3g}, in `{short}`",
                    "", "A larger output rank (`--rank`, or `--rank full`) lowers these errors at the cost of size."]
    else:
        out.append("No per-module errors were recorded.")

    out += ["", "## Use", "", "```python", "from peft import PeftModel", "",
            f"model = PeftModel.from_pretrained(base_model, \"path/to/this/folder\")  # base: {base or 'the inputs’ base model'}",
            "```", "", "The same merge again (inputs named as above, same bytes out):", "", "```bash",
            "adaptermerge merge " + " ".join(str(i.get("name")) for i in inputs) + " " + " ".join(_cli_flags(settings))
            + " -o merged/", "```",
            "", "`adaptermerge inspect` on this folder shows every module, its rank and the full provenance.", ""]
    return "\n".join(out)
