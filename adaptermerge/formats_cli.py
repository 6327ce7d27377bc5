"""The CLI's use of the format layer: open inputs of any format, pick the output format, merge through a sink, and
the ``convert`` command. Kept apart from cli.py so that the command definitions only call into it."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from . import formats
from .adapter import Adapter
from .errors import ParameterError


@dataclass
class FormatOptions:
    to: str | None
    profile: str | None
    in_format: str | None
    base: Path | None
    ignore_unknown: bool
    gguf_arch: str | None

    def _file_target(self, target: Path) -> bool:
        return self.to in ("gguf", "kohya", "diffusers") or self.profile == "llama.cpp" or target.suffix == ".gguf"

    def check_output(self, target: Path, *, force: bool, inputs: list[Path]) -> None:
        """Before any input is opened: option values, and the output path (a file for GGUF/kohya/diffusers)."""
        formats.output_format(target, self.to, [], self.profile)  # validates --to / --for
        if self.in_format is not None and self.in_format not in formats.INPUT_FORMATS:
            raise ParameterError(f"--format must be one of {', '.join(formats.INPUT_FORMATS)}, got {self.in_format!r}")
        if self._file_target(target) and target.suffix != ".safetensors":
            from .formats.gguf_io import check_file_output

            check_file_output(target, force=force, inputs=inputs, create_parent=False)
            return
        from .formats.sinks import check_pipeline_target

        check_pipeline_target(target, force=force, inputs=inputs)

    def load_inputs(self, paths: Sequence[str], alphas: Sequence[float | None]) -> list[Adapter]:
        ads = []
        for p, a in zip(paths, alphas):
            ads.append(formats.load(p, format=self.in_format, base=self.base, ignore_unknown=self.ignore_unknown,
                                    alpha=a if os.path.isfile(p) else None))
        return formats.align(ads)

    def output_format(self, target: Path, adapters: Sequence[Adapter]) -> str:
        return formats.output_format(target, self.to, [getattr(a, "format", "peft") for a in adapters], self.profile)

    def needs_sink(self, target: Path, adapters: Sequence[Adapter]) -> bool:
        return formats.needs_sink(adapters, self.output_format(target, adapters), self.profile)

    def merge_and_save(self, target: Path, adapters: Sequence[Adapter], method: str, weights, *, force: bool,
                       allow_nonfinite: bool, progress, **kw: Any) -> dict[str, Any]:
        """Merge in memory (outputs are factors: small), then write through the output format's sink."""
        from .engine import merge

        fmt = self.output_format(target, adapters)
        merged = merge(adapters, method, weights, allow_nonfinite=allow_nonfinite, progress=progress, **kw)
        report = formats.save(merged, target, to=fmt, force=force, dtype=kw.get("dtype", getattr(method, "dtype", None)),
                              layout=formats.merged_layout(adapters), inputs=[a.path for a in adapters if a.path],
                              profile=self.profile, gguf_arch=self.gguf_arch, base=self.base)
        summary = merged.summary
        summary["output_format"] = report
        summary["output_notes"] = output_notes(report)
        return summary


def output_notes(report: dict[str, Any]) -> list[str]:
    """What the sink did that the user should know: the profile's rank and truncation errors, GGUF's alpha, Flux fusion."""
    notes = []
    prof = report.get("profile")
    if prof:
        errs = prof["truncation_errors"]
        worst = max(errs.items(), key=lambda kv: kv[1]) if errs else None
        notes.append(f"--for {prof['name']}: every module at rank {prof['rank']} (accepted: {', '.join(map(str, prof['accepted_ranks']))}); "
                     + (f"{len(errs)} module(s) truncated, largest relative error {worst[1]:.3g} ({worst[0]})" if worst else "no truncation (zero padding is exact)"))
    if report.get("format") == "gguf":
        notes.append(f"GGUF architecture {report['architecture']}, adapter.lora.alpha={report['alpha']:g}")
    if report.get("flux_fused"):
        notes.append("Flux modules fused back into kohya's qkv / linear1 blocks (rank = sum of the parts' ranks)")
    return notes


def scales_note(a: Adapter) -> str:
    own = getattr(a, "reported_scales", {})
    c = Counter(round(own.get(n, m.scale), 6) for n, m in a.modules.items())
    return "scale per module: " + ", ".join(f"{s:g} (x{n})" for s, n in sorted(c.items()))


def add_input_reports(summary: dict[str, Any], adapters: Sequence[Adapter]) -> None:
    """Per input: format, detection, name mapping, key coverage, and the scale of every module."""
    for inp, a in zip(summary.get("inputs", []), adapters):
        cov = getattr(a, "coverage", None)
        if cov is not None:
            inp["format"] = cov.as_dict()
        own = getattr(a, "reported_scales", {})
        inp["scales"] = {n: own.get(n, m.scale) for n, m in a.modules.items()}
        if getattr(a, "format", "peft") != "peft":
            inp.setdefault("notes", []).append(scales_note(a))


def convert(path: Path, output: Path, *, to: str | None, profile: str | None, in_format: str | None, base: Path | None,
            ignore_unknown: bool, gguf_arch: str | None, dtype: str | None, alpha: float | None, force: bool) -> dict[str, Any]:
    opts = FormatOptions(to, profile, in_format, base, ignore_unknown, gguf_arch)
    opts.check_output(output, force=force, inputs=[path])
    a = formats.load(path, format=in_format, base=base, ignore_unknown=ignore_unknown,
                     alpha=alpha if path.is_file() else None)
    fmt = opts.output_format(output, [a])
    report = formats.save(a, output, to=fmt, force=force, dtype=dtype, inputs=[path], profile=profile,
                          gguf_arch=gguf_arch, base=base)
    return {"input": a.coverage.as_dict(), "output": report, "modules": len(a.modules),
            "notes": list(a.notes) + [scales_note(a)] + output_notes(report), "scales": {n: m.scale for n, m in a.modules.items()}}
