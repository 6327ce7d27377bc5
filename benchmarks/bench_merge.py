"""Benchmark: adaptermerge vs PEFT ``add_weighted_adapter`` on three rank-16 LoRA adapters of a Llama-3.2-1B.

Setting: 3 LoRA adapters (r=16, lora_alpha=32, fp32, seeded random non-zero A and B) over q,k,v,o,gate,up,down of
every decoder layer of a Llama with hidden 2048, intermediate 8192, 32 heads, 8 KV heads (Llama-3.2-1B shapes),
saved as ordinary PEFT adapter directories. Weights 0.5, 0.3, 0.2; density 0.5; output rank 16.

Every scenario is a separate whole process, timed from process start to exit, with its peak RSS (``os.wait4``):

* ours:  ``adaptermerge merge`` (CLI) with linear / task_arithmetic / ties / dare_ties at ``--rank 16``, and cat.
* floor: ``benchmarks/floor_io.py`` — import torch + safetensors, read the inputs, write the cat-sized output.
* peft:  ``benchmarks/peft_merge.py`` — build ``LlamaForCausalLM(config)``, load the three adapters,
  ``add_weighted_adapter`` with ``svd`` / ``ties_svd`` / ``dare_ties_svd`` (svd_rank 16) or ``cat``, save.

Then the outputs are checked side by side (relative error against the exact weighted sum for linear / cat, and
each tool's truncation error against its own dense TIES result), and a table with the project's targets is printed.

Results are cached per configuration under ``--workdir`` (default /tmp/am-bench/L{layers}-T{threads}/), so reruns
only do what is missing; ``--rerun`` redoes named scenarios. Examples:

    .venv/bin/python benchmarks/bench_merge.py --layers 2 --skip-peft          # quick look at our side
    .venv/bin/python benchmarks/bench_merge.py --layers 2                      # both sides, 2 layers
    nohup .venv/bin/python benchmarks/bench_merge.py --peft-methods svd,ties_svd,dare_ties_svd,cat \\
        > /tmp/am-bench/full.log 2>&1 &                                           # the full 16-layer run
    .venv/bin/python benchmarks/bench_merge.py --report --markdown             # table from cached results only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
WEIGHTS = (0.5, 0.3, 0.2)
DENSITY = 0.5
RANK = 16
LORA_R = 16
LORA_ALPHA = 32
N_INPUTS = 3
HIDDEN, INTERMEDIATE, KV_OUT = 2048, 8192, 512
#: (module path inside a layer, out_features, in_features) for Llama-3.2-1B.
PROJECTIONS = (
    ("self_attn.q_proj", HIDDEN, HIDDEN),
    ("self_attn.k_proj", KV_OUT, HIDDEN),
    ("self_attn.v_proj", KV_OUT, HIDDEN),
    ("self_attn.o_proj", HIDDEN, HIDDEN),
    ("mlp.gate_proj", INTERMEDIATE, HIDDEN),
    ("mlp.up_proj", INTERMEDIATE, HIDDEN),
    ("mlp.down_proj", HIDDEN, INTERMEDIATE),
)
GEN_VERSION = 1  # bump when the generated inputs change
MB = 1_000_000
RSS_LIMIT_MB = 1000.0


# --------------------------------------------------------------------------------------------------- scenarios
@dataclass(frozen=True)
class Scenario:
    name: str
    group: str  # ours | floor | peft
    method: str  # adaptermerge method, PEFT combination type, or "cat" for the floor

    def out_dir(self, work: Path) -> Path:
        return work / "out" / self.name

    def merged_dir(self, work: Path) -> Path:
        """Where the merged adapter's files are (PEFT saves a non-default adapter in a subfolder)."""
        return self.out_dir(work) / "merged" if self.group == "peft" else self.out_dir(work)


OURS = [Scenario(f"ours_{m}", "ours", m) for m in ("linear", "task_arithmetic", "ties", "dare_ties", "cat")]
FLOOR = [Scenario("floor_cat", "floor", "cat")]
PEFT_METHODS = ("cat", "svd", "ties_svd", "dare_ties_svd")  # run order: cheapest first
PEFT = {m: Scenario(f"peft_{m}", "peft", m) for m in PEFT_METHODS}
#: (our scenario, baseline scenarios in order of preference, target kind, target value)
TARGETS = [
    ("ours_linear", ("peft_svd",), "speedup", 100.0),
    ("ours_task_arithmetic", ("peft_svd",), "speedup", 100.0),
    ("ours_ties", ("peft_ties_svd",), "speedup", 30.0),
    ("ours_dare_ties", ("peft_dare_ties_svd", "peft_ties_svd"), "speedup", 30.0),
    ("ours_cat", ("floor_cat",), "slowdown", 1.5),
]


def command(s: Scenario, inputs: Sequence[Path], work: Path, layers: int, threads: int) -> list[str]:
    """The command line of one scenario."""
    ins = [str(p) for p in inputs]
    weights = ",".join(f"{w:g}" for w in WEIGHTS)
    out = str(s.out_dir(work))
    if s.group == "ours":
        cli = Path(sys.executable).parent / "adaptermerge"
        head = [str(cli)] if cli.exists() else [sys.executable, "-m", "adaptermerge"]
        cmd = head + ["merge", *ins, "--method", s.method, "--weights", weights, "-o", out, "--force", "--json", "-q"]
        if s.method in ("ties", "dare_ties"):
            cmd += ["--density", f"{DENSITY:g}"]
        if s.method != "cat":
            cmd += ["--rank", str(RANK)]
        return cmd
    if s.group == "floor":
        return [sys.executable, str(HERE / "floor_io.py"), out, *ins, "--weights", weights]
    cmd = [sys.executable, str(HERE / "peft_merge.py"), out, *ins, "--combination-type", s.method,
           "--weights", weights, "--layers", str(layers), "--threads", str(threads)]
    if s.method != "cat":
        cmd += ["--svd-rank", str(RANK)]
    if "ties" in s.method:
        cmd += ["--density", f"{DENSITY:g}"]
    return cmd


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # let every tool start from cached bytecode, as after a normal install
    return env


# ------------------------------------------------------------------------------------------------ measurement
def run_process(cmd: Sequence[str], env: dict[str, str], log_dir: Path, tag: str) -> dict[str, Any]:
    """Run ``cmd`` to completion; wall seconds from spawn to reaping, peak RSS (MB) of the process, exit code.

    ``os.wait4`` returns the resource usage of exactly this child, so no wrapper process is measured.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / f"{tag}.stdout", log_dir / f"{tag}.stderr"
    with open(out_path, "wb") as fo, open(err_path, "wb") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), env=env, stdout=fo, stderr=fe)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss_bytes = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {
        "wall_s": round(wall, 3),
        "peak_rss_mb": round(rss_bytes / MB, 1),
        "user_s": round(usage.ru_utime, 2),
        "sys_s": round(usage.ru_stime, 2),
        "rc": proc.returncode,
        "stdout": str(out_path),
        "stderr": str(err_path),
        "loadavg_after": round(os.getloadavg()[0], 2),
    }


def parse_json_output(path: str) -> dict[str, Any] | None:
    """The JSON a scenario printed on stdout: the whole stdout, or its last line."""
    text = Path(path).read_text(errors="replace").strip()
    for candidate in (text, text.splitlines()[-1] if text else ""):
        try:
            value = json.loads(candidate)
            return value if isinstance(value, dict) else None
        except json.JSONDecodeError:
            continue
    return None


def run_once(s: Scenario, cmd: list[str], env: dict[str, str], work: Path, i: int, repeats: int) -> dict[str, Any]:
    """Run one repetition of a scenario; exits with the scenario's last stderr lines if it fails."""
    log(f"run {s.name} [{i + 1}/{repeats}]: {' '.join(cmd)}")
    load_before = round(os.getloadavg()[0], 2)
    r = run_process(cmd, env, work / "logs", f"{s.name}.{i}")
    r["loadavg_before"] = load_before
    log(f"  -> rc {r['rc']}, {r['wall_s']:.2f} s, {r['peak_rss_mb']:.0f} MB (load {load_before} -> {r['loadavg_after']})")
    if r["rc"] != 0:
        tail = Path(r["stderr"]).read_text(errors="replace").strip().splitlines()[-5:]
        raise SystemExit(f"error: scenario {s.name} failed with exit code {r['rc']}:\n  " + "\n  ".join(tail))
    return r


def summarize(s: Scenario, cmd: list[str], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median wall, max peak RSS, and the in-process timings the scenario printed."""
    printed = parse_json_output(runs[-1]["stdout"]) or {}
    inner: dict[str, Any] = {}
    if s.group == "ours":
        seconds = [(parse_json_output(r["stdout"]) or {}).get("seconds") for r in runs]
        inner = {"merge_s": statistics.median(seconds) if None not in seconds else None,
                 "max_rel_error": printed.get("max_rel_error"), "mean_rel_error": printed.get("mean_rel_error"),
                 "n_modules": printed.get("n_modules")}
    elif s.group == "peft":
        inner = {"phases": printed.get("phases"), "threads": printed.get("threads"),
                 "merge_s": (printed.get("phases") or {}).get("add_weighted_adapter")}
    return {
        "scenario": s.name,
        "group": s.group,
        "method": s.method,
        "cmd": cmd,
        "runs": runs,
        "wall_s": round(statistics.median(r["wall_s"] for r in runs), 3),
        "wall_min_s": min(r["wall_s"] for r in runs),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        **inner,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def measure_all(todo: list[Scenario], inputs: list[Path], work: Path, args: argparse.Namespace, results_dir: Path) -> None:
    """Measure the scenarios: the quick ones round-robin (repetition r of every scenario before repetition r+1, so
    a change in the machine's load hits all of them alike), then each PEFT scenario once. Results are saved per
    scenario as soon as it is complete."""
    env = child_env(args.threads)
    cmds = {s.name: command(s, inputs, work, args.layers, args.threads) for s in todo}

    def save(s: Scenario, runs: list[dict[str, Any]]) -> None:
        res = summarize(s, cmds[s.name], runs)
        res.update(layers=args.layers, threads=args.threads)
        (results_dir / f"{s.name}.json").write_text(json.dumps(res, indent=2))

    quick = [s for s in todo if s.group != "peft"]
    runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in quick}
    for i in range(args.repeats):
        for s in quick:
            runs[s.name].append(run_once(s, cmds[s.name], env, work, i, args.repeats))
    for s in quick:
        save(s, runs[s.name])
    for s in (s for s in todo if s.group == "peft"):
        save(s, [run_once(s, cmds[s.name], env, work, 0, 1)])


# ------------------------------------------------------------------------------------------------ inputs
def module_names(layers: int) -> list[tuple[str, int, int]]:
    return [(f"base_model.model.model.layers.{i}.{p}", out_f, in_f) for i in range(layers) for p, out_f, in_f in PROJECTIONS]


def adapter_config(layers: int) -> dict[str, Any]:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "revision": None,
        "r": LORA_R, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": sorted(p.rsplit(".", 1)[-1] for p, _, _ in PROJECTIONS), "use_rslora": False,
        "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "inference_mode": True,
        "init_lora_weights": True, "layers_to_transform": None,
    }


def write_adapter(path: Path, layers: int, seed: int) -> None:
    """One seeded random LoRA adapter (A ~ N(0, 1/in), B ~ N(0, 0.02^2)) as a PEFT directory."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, out_f, in_f in module_names(layers):
        tensors[f"{name}.lora_A.weight"] = torch.randn(LORA_R, in_f, generator=gen) / in_f**0.5
        tensors[f"{name}.lora_B.weight"] = torch.randn(out_f, LORA_R, generator=gen) * 0.02
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(adapter_config(layers), indent=2))


def ensure_inputs(base: Path, layers: int) -> list[Path]:
    """The three input adapters for ``layers`` layers, generated once and reused (stamped with their recipe)."""
    root = base / f"inputs-L{layers}"
    stamp = {"gen_version": GEN_VERSION, "layers": layers, "r": LORA_R, "alpha": LORA_ALPHA, "seeds": [1000 + i for i in range(N_INPUTS)]}
    paths = [root / f"adapter_{chr(ord('a') + i)}" for i in range(N_INPUTS)]
    stamp_file = root / "stamp.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp and all((p / "adapter_model.safetensors").exists() for p in paths):
        return paths
    log(f"generating {N_INPUTS} adapters with {layers} layers under {root}")
    for i, p in enumerate(paths):
        write_adapter(p, layers, 1000 + i)
    stamp_file.write_text(json.dumps(stamp))
    return paths


# ------------------------------------------------------------------------------------------------ correctness
def read_peft_module(adapter_dir: Path, name: str):
    """(B, A, scale) of one module of a PEFT adapter directory, with PEFT's rank/alpha pattern and rsLoRA rules."""
    import re

    from safetensors import safe_open

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        b = f.get_tensor(f"{name}.lora_B.weight").double()
        a = f.get_tensor(f"{name}.lora_A.weight").double()
    key = name.removeprefix("base_model.model.")

    def pattern_value(patterns: dict[str, Any], default: float) -> float:
        for p, v in patterns.items():
            if re.match(rf"(.*\.)?({p})$", key):
                return float(v)
        return float(default)

    r = pattern_value(cfg.get("rank_pattern") or {}, cfg["r"])
    alpha = pattern_value(cfg.get("alpha_pattern") or {}, cfg["lora_alpha"])
    if int(r) != a.shape[0]:
        raise SystemExit(f"error: {adapter_dir}: module {name} has rank {a.shape[0]} but its config says r={r:g}")
    scale = alpha / (r**0.5 if cfg.get("use_rslora") else r)
    return b, a, scale


def delta(adapter_dir: Path, name: str):
    b, a, scale = read_peft_module(adapter_dir, name)
    return scale * (b @ a)


def rel(x, ref) -> float:
    import torch

    return float(torch.linalg.norm((x - ref).double()) / torch.linalg.norm(ref.double()))


def optimal_error(d, rank: int) -> float:
    """Relative Frobenius error of the best rank-``rank`` approximation of ``d`` (Eckart-Young, exact SVD)."""
    import torch

    s = torch.linalg.svdvals(d.double())
    return float((s[rank:].square().sum() / s.square().sum()).sqrt())


def check_outputs(work: Path, inputs: list[Path], layers: int, done: set[str]) -> dict[str, Any]:
    """Side-by-side correctness on three modules (layer 0 q/k, last layer down_proj)."""
    import torch

    names = ["base_model.model.model.layers.0.self_attn.q_proj", "base_model.model.model.layers.0.self_attn.k_proj",
             f"base_model.model.model.layers.{layers - 1}.mlp.down_proj"]
    result: dict[str, Any] = {"modules": names, "linear": {}, "ties": {}, "cat": {}, "recorded": {}}
    by_name = {s.name: s for s in OURS + FLOOR + list(PEFT.values())}
    for name in names:
        deltas = [delta(p, name) for p in inputs]  # float64
        exact = sum(w * d for w, d in zip(WEIGHTS, deltas))
        short = name.split("layers.", 1)[1]
        lin = {"optimal_rank16": optimal_error(exact, RANK)}
        for sc in ("ours_linear", "ours_task_arithmetic", "peft_svd"):
            if sc in done:
                lin[sc] = rel(delta(by_name[sc].merged_dir(work), name), exact)
        result["linear"][short] = lin
        cat = {}
        for sc in ("ours_cat", "floor_cat", "peft_cat"):
            if sc in done:
                cat[sc] = rel(delta(by_name[sc].merged_dir(work), name), exact)
        result["cat"][short] = cat
        ties: dict[str, Any] = {}
        d32 = [d.float() for d in deltas]
        if "peft_ties_svd" in done:
            from peft.utils.merge_utils import ties as peft_ties

            target = peft_ties(d32, torch.tensor(WEIGHTS), DENSITY, "total").double()
            ties["peft_ties_svd"] = {"trunc_error": rel(delta(by_name["peft_ties_svd"].merged_dir(work), name), target),
                                      "optimal_rank16": optimal_error(target, RANK)}
            peft_target = target
        if "ours_ties" in done:
            import adaptermerge as am

            target = am.ops.ties(d32, list(WEIGHTS), density=DENSITY).double()
            ties["ours_ties"] = {"trunc_error": rel(delta(by_name["ours_ties"].merged_dir(work), name), target),
                                 "optimal_rank16": optimal_error(target, RANK)}
            if "peft_ties_svd" in done:  # the conventions differ (see docs/performance.md): compare direction and size
                cos = float((target * peft_target).sum() / (torch.linalg.norm(target) * torch.linalg.norm(peft_target)))
                ties["dense_ties_ours_vs_peft"] = {"cosine": cos, "norm_ratio": float(torch.linalg.norm(target) / torch.linalg.norm(peft_target))}
        result["ties"][short] = ties
    for sc in ("ours_ties", "ours_dare_ties", "ours_linear"):
        if sc in done:
            from safetensors import safe_open

            with safe_open(str(by_name[sc].merged_dir(work) / "adapter_model.safetensors"), "pt") as f:
                errs = json.loads((f.metadata() or {}).get("adaptermerge.rel_errors", "{}"))
            if errs:
                result["recorded"][sc] = {"max": max(errs.values()), "mean": sum(errs.values()) / len(errs), "n": len(errs)}
    return result


# ------------------------------------------------------------------------------------------------ reporting
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_info(threads: int) -> dict[str, Any]:
    cpu = cpu_model()
    probe = subprocess.run(
        [sys.executable, "-c", "import torch, transformers, peft, safetensors; print(torch.get_num_threads(), torch.__version__, "
         "transformers.__version__, peft.__version__, safetensors.__version__)"],
        env=child_env(threads), capture_output=True, text=True,
    ).stdout.split()
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "memory_gib": round(mem_gb, 1), "python": platform.python_version(),
        "platform": platform.platform(), "threads_env": threads,
        "torch_threads_in_children": int(probe[0]) if probe else None,
        "torch": probe[1] if probe else None, "transformers": probe[2] if probe else None,
        "peft": probe[3] if probe else None, "safetensors": probe[4] if probe else None,
    }


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def cpu_seconds(r: dict[str, Any]) -> float:
    """Median user+sys CPU seconds of a scenario's runs (less sensitive than wall time to other load)."""
    return statistics.median(x["user_s"] + x["sys_s"] for x in r["runs"])


def build_table(results: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]], list[tuple[str, bool, str]]]:
    """Rows of the comparison table and the verdict on every target."""
    header = ["scenario", "wall s", "CPU s", "in-process merge s", "peak RSS MB", "compared with", "ratio", "target", "met"]
    rows: list[list[str]] = []
    verdicts: list[tuple[str, bool, str]] = []
    target_of = {t[0]: t for t in TARGETS}
    order = [s.name for s in OURS + FLOOR] + [PEFT[m].name for m in PEFT_METHODS]
    for name in order:
        r = results.get(name)
        if r is None:
            continue
        ref, ratio, target, met = "", "", "", ""
        if name in target_of:
            _, refs, kind, value = target_of[name]
            base = next((results[b] for b in refs if b in results), None)
            if base is not None:
                ref = base["scenario"]
                if kind == "speedup":
                    q, qc = base["wall_s"] / r["wall_s"], cpu_seconds(base) / cpu_seconds(r)
                    ratio, target, ok = f"{q:.1f}x faster (CPU {qc:.1f}x)", f">= {value:g}x faster", q >= value
                else:
                    q, qc = r["wall_s"] / base["wall_s"], cpu_seconds(r) / cpu_seconds(base)
                    ratio, target, ok = f"{q:.2f}x the floor (CPU {qc:.2f}x)", f"<= {value:g}x the floor", q <= value
                met = "yes" if ok else "NO"
                if r["group"] == "ours":
                    verdicts.append((f"{name} vs {ref}: {ratio} (target {target})", ok, name))
        if r["group"] == "ours":
            ok = r["peak_rss_mb"] < RSS_LIMIT_MB
            verdicts.append((f"{name} peak RSS {r['peak_rss_mb']:.0f} MB (target < {RSS_LIMIT_MB:g} MB)", ok, name))
            if not ok:
                met = (met + ", " if met else "") + "RSS NO"
        n = len(r["runs"])
        wall = f"{r['wall_s']:.2f}" + (f" (median of {n})" if n > 1 else "")
        rows.append([name, wall, f"{cpu_seconds(r):.2f}", fmt(r.get("merge_s")), f"{r['peak_rss_mb']:.0f}", ref, ratio, target, met])
    return header, rows, verdicts


def render(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def render_check(check: dict[str, Any]) -> str:
    out = ["correctness (relative Frobenius errors):"]
    for mod, d in check["linear"].items():
        out.append(f"  linear   {mod:28s} " + ", ".join(f"{k} {v:.6f}" for k, v in d.items()))
    for mod, d in check["cat"].items():
        if d:
            out.append(f"  cat      {mod:28s} vs exact weighted sum: " + ", ".join(f"{k} {v:.2e}" for k, v in d.items()))
    for mod, d in check["ties"].items():
        parts = []
        for k, v in d.items():
            if "cosine" in v:
                parts.append(f"dense TIES ours vs PEFT: cosine {v['cosine']:.3f}, norm ratio {v['norm_ratio']:.3f}")
            else:
                parts.append(f"{k} trunc {v['trunc_error']:.6f} (optimal {v['optimal_rank16']:.6f})")
        if parts:
            out.append(f"  ties     {mod:28s} " + "; ".join(parts))
    for sc, d in check["recorded"].items():
        out.append(f"  recorded in {sc} output metadata over {d['n']} modules: max {d['max']:.6f}, mean {d['mean']:.6f}")
    return "\n".join(out)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ main
def select(args: argparse.Namespace) -> list[Scenario]:
    groups = {g.strip() for g in args.only.split(",")} if args.only else {"ours", "floor", "peft"}
    if args.skip_peft:
        groups.discard("peft")
    peft_methods = [m.strip() for m in args.peft_methods.split(",") if m.strip()]
    bad = [m for m in peft_methods if m not in PEFT]
    if bad:
        raise SystemExit(f"error: --peft-methods: unknown {bad}; choose from {list(PEFT_METHODS)}")
    chosen = [s for s in OURS + FLOOR if s.group in groups or s.name in groups]
    chosen += [PEFT[m] for m in peft_methods if "peft" in groups or PEFT[m].name in groups]
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--layers", type=int, default=16, help="decoder layers (both sides alike; default 16 = Llama-3.2-1B)")
    ap.add_argument("--threads", type=int, default=2, help="OMP/MKL threads = torch threads of every scenario (default 2)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "am-bench")
    ap.add_argument("--only", default=None, help="comma-separated groups (ours, floor, peft) or scenario names")
    ap.add_argument("--skip-peft", action="store_true", help="leave out the PEFT scenarios")
    ap.add_argument("--peft-methods", default="svd,ties_svd,cat", help=f"PEFT combination types to run ({','.join(PEFT_METHODS)})")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each ours/floor scenario (median reported); PEFT runs once")
    ap.add_argument("--rerun", default="", help="comma-separated scenario names to measure again, or 'all'")
    ap.add_argument("--report", action="store_true", help="measure nothing; print the table from cached results")
    ap.add_argument("--no-check", action="store_true", help="skip the side-by-side correctness check")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = ap.parse_args(argv)
    if args.layers < 1 or args.threads < 1 or args.repeats < 1:
        raise SystemExit("error: --layers, --threads and --repeats must be >= 1")

    work = args.workdir / f"L{args.layers}-T{args.threads}"
    results_dir = work / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    rerun = {x.strip() for x in args.rerun.split(",") if x.strip()}
    inputs = ensure_inputs(args.workdir, args.layers)
    info_path = results_dir / "machine.json"
    if not args.report or not info_path.exists():
        info_path.write_text(json.dumps(machine_info(args.threads), indent=2))
    info = json.loads(info_path.read_text())

    if not args.report:
        todo = []
        for s in select(args):
            path = results_dir / f"{s.name}.json"
            if path.exists() and not ({"all", s.name} & rerun):
                log(f"{s.name}: cached ({path})")
            else:
                todo.append(s)
        measure_all(todo, inputs, work, args, results_dir)

    results = {p.stem: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json")) if p.stem not in ("machine", "check")}
    check_path = results_dir / "check.json"
    if not args.no_check and results:
        done = {n for n in results if (Scenario(n, results[n]["group"], results[n]["method"]).merged_dir(work) / "adapter_config.json").exists()}
        stale = not check_path.exists() or json.loads(check_path.read_text()).get("done") != sorted(done) or (
            max((results_dir / f"{n}.json").stat().st_mtime for n in done) > check_path.stat().st_mtime if done else False)
        if stale and not args.report:
            os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
            log("checking outputs side by side")
            check = check_outputs(work, inputs, args.layers, done)
            check["done"] = sorted(done)
            check_path.write_text(json.dumps(check, indent=2))

    header, rows, verdicts = build_table(results)
    print(f"\n{args.layers} layers x 7 projections = {args.layers * 7} modules, 3 inputs r={LORA_R} alpha={LORA_ALPHA} fp32, "
          f"weights {','.join(map(str, WEIGHTS))}, density {DENSITY}, rank {RANK}; {args.threads} thread(s) "
          f"(torch.get_num_threads() = {info.get('torch_threads_in_children')} in every scenario)")
    print(f"machine: {info.get('cpu')}, {info.get('logical_cpus')} logical CPUs, {info.get('memory_gib')} GiB; torch {info.get('torch')}, "
          f"transformers {info.get('transformers')}, peft {info.get('peft')}; work dir {work}\n")
    print(render(header, rows, args.markdown))
    for name in (PEFT[m].name for m in PEFT_METHODS):
        if name in results and results[name].get("phases"):
            print(f"{name} phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results[name]["phases"].items()))
    if verdicts:
        print("\ntargets:")
        for text, ok, _ in verdicts:
            print(f"  [{'met' if ok else 'MISSED'}] {text}")
    if check_path.exists():
        print()
        print(render_check(json.loads(check_path.read_text())))
    return 0 if all(ok for _, ok, _ in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
