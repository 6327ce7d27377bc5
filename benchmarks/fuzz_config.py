"""Fuzzer for ``adaptermerge merge --config`` recipes and output paths: hostile configs, hostile outputs.

Every iteration writes a merge recipe (YAML, TOML or JSON) built from a valid one by random edits — wrong types
(``"false"`` for a flag, lists, mappings, huge and non-finite numbers, huge strings), YAML aliases and alias bombs,
duplicate keys, unknown keys, deep nesting, lone surrogates, control characters and rich markup in values, inputs
given as links (to folders, to files, into a store folder, loops, dangling) — and picks an output path that is new,
nested, an existing adapter output, a foreign folder, a FIFO, a character device (as root), a socket, a link to an
input or to the store that holds an input's real weights, a dangling link, a link loop, or an input itself. Now and
then the recipe itself is a FIFO, a link to /dev/zero or a sparse 8 GiB file. It then runs the real command line
(``adaptermerge.cli.main``) in this process, and checks:

* no exception escapes ``main`` and the exit code is one of 0, 2, 3, 4, 5 (1 is a traceback: a bug);
* a failure prints exactly one line, ``error: ...``, of at most 4100 characters, with no raw control character;
* every input file (the store's real weights included) is byte-identical, every special file and link is still
  there with its type and target, the foreign folder is untouched, no temporary file is left;
* a success wrote a loadable adapter, and only where an output existed if ``force`` was a real ``true``;
* no iteration uses more than ``--hang-seconds`` of CPU (a slow path) or ``--block-seconds`` of wall-clock time (a
  FIFO that blocks uses no CPU), or more memory than ``--max-memory-gb`` (the process caps its own address space).

    OMP_NUM_THREADS=1 nohup nice -n 19 python benchmarks/fuzz_config.py --minutes 30 --seed 1 --out fuzz-config-out
    python benchmarks/fuzz_config.py --replay fuzz-config-out/finding-000

Findings are saved (recipe, output kind, command line, traceback) and deduplicated by kind and raising line.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import resource
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import adaptermerge as am  # noqa: E402
from adaptermerge.cli import main  # noqa: E402
from adaptermerge.safetensors_io import TEMP_PREFIX  # noqa: E402

torch.set_num_threads(1)

MODS = {"model.layers.0.self_attn.q_proj": (8, 6), "model.layers.0.self_attn.v_proj": (4, 6)}
CODES = {0, 2, 3, 4, 5}
METHODS = ["linear", "task_arithmetic", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs", "della"]


class Hang(BaseException):
    """Raised by the alarm: not an Exception, so no handler under test can swallow it."""


# ---------------------------------------------------------------------------------------------------- fixtures
def build_inputs(root: Path) -> dict[str, Path]:
    """Inputs in every shape a recipe can name: a folder, a folder whose weights are a link into store/, a bare
    file, a link to a folder, a link to a bare file, a link loop, a dangling link, a missing path."""
    from conftest import write_adapter

    write_adapter(root / "b", MODS, r=2, alpha=4, seed=1)
    write_adapter(root / "real", MODS, r=2, alpha=4, seed=2)
    store = root / "store"
    store.mkdir()
    a = root / "a"
    a.mkdir()
    os.replace(root / "real" / "adapter_model.safetensors", store / "w.safetensors")
    os.replace(root / "real" / "adapter_config.json", a / "adapter_config.json")
    (root / "real").rmdir()
    (a / "adapter_model.safetensors").symlink_to(store / "w.safetensors")
    write_adapter(root / "c.safetensors", MODS, r=2, seed=3, bare=True, metadata={"lora_alpha": "4"})
    (root / "blink").symlink_to(root / "b", target_is_directory=True)
    (root / "clink.safetensors").symlink_to(root / "c.safetensors")
    (root / "loop").symlink_to(root / "loop")
    (root / "dangling").symlink_to(root / "nothing")
    return {"a": a, "b": root / "b", "c": root / "c.safetensors", "blink": root / "blink", "clink": root / "clink.safetensors",
            "loop": root / "loop", "dangling": root / "dangling", "missing": root / "missing", "store": store}


def fingerprint(root: Path, skip: str = "") -> dict[str, str]:
    """Every entry under root, links not followed: sha256 of regular files, '<dir>', type and target otherwise."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if rel == skip:
            continue
        st = os.lstat(p)
        if stat.S_ISREG(st.st_mode):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = "<dir>"
        else:
            out[rel] = f"<{stat.S_IFMT(st.st_mode):o}:{os.readlink(p) if stat.S_ISLNK(st.st_mode) else ''}>"
    return out


# what may be replaced with force when it is not an input of the merge: an adapter folder or a regular file
REPLACEABLE = {"existing_output", "existing_output_file", "empty_dir", "link_to_input", "input_dir", "input_file",
               "store_weights"}
OUTPUT_KINDS = ["new", "new_nested", "new_file", "existing_output", "existing_output_file", "empty_dir", "foreign_dir",
                "fifo", "fifo_file", "chardev", "socket", "link_to_input", "link_to_store", "link_to_fifo", "dangling",
                "loop", "store", "store_weights", "input_dir", "input_file", "inside_input", "regular_file_as_dir",
                "dir_as_file", "parent_is_file"]


def make_output(kind: str, work: Path, inputs: dict[str, Path], previous: Path) -> tuple[Path, bool]:
    """An output path of the given kind under work/ (or pointing at an input). Returns (path, existed)."""
    o = work / "out"
    f = work / "out.safetensors"
    if kind == "new":
        return o, False
    if kind == "new_nested":
        return work / "x" / "y" / "out", False
    if kind == "new_file":
        return f, False
    if kind == "existing_output":
        shutil.copytree(previous, o)
        return o, True
    if kind == "existing_output_file":
        shutil.copy(previous / "adapter_model.safetensors", f)
        return f, True
    if kind == "empty_dir":
        o.mkdir()
        return o, True
    if kind == "foreign_dir":
        o.mkdir()
        (o / "photo.jpg").write_bytes(b"\xff\xd8 not an adapter")
        return o, True
    if kind in ("fifo", "fifo_file"):
        p = o if kind == "fifo" else f
        os.mkfifo(p)
        return p, True
    if kind == "chardev":
        if os.geteuid() != 0:
            os.mkfifo(o)
        else:
            os.mknod(o, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # the null device
        return o, True
    if kind == "socket":
        s, cwd = socket.socket(socket.AF_UNIX), os.getcwd()
        os.chdir(work)
        try:
            s.bind("out")
        finally:
            os.chdir(cwd)
            s.close()
        return o, True
    if kind == "link_to_input":
        o.symlink_to(inputs["b"], target_is_directory=True)
        return o, True
    if kind == "link_to_store":
        o.symlink_to(inputs["store"], target_is_directory=True)
        return o, True
    if kind == "link_to_fifo":
        os.mkfifo(work / "fifo")
        o.symlink_to(work / "fifo")
        return o, True
    if kind == "dangling":
        o.symlink_to(work / "nothing")
        return o, True
    if kind == "loop":
        o.symlink_to(o)
        return o, True
    if kind == "store":
        return inputs["store"], True
    if kind == "store_weights":
        return inputs["store"] / "w.safetensors", True
    if kind == "input_dir":
        return inputs["b"], True
    if kind == "input_file":
        return inputs["c"], True
    if kind == "inside_input":
        return inputs["b"] / "sub", False
    if kind == "regular_file_as_dir":
        o.write_bytes(b"a plain file")
        return o, True
    if kind == "dir_as_file":
        f.mkdir()
        return f, True
    (work / "plain").write_bytes(b"x")  # parent_is_file
    return work / "plain" / "out", False


# ---------------------------------------------------------------------------------------------------- recipes
HOSTILE_STRINGS = ["false", "true", "no", "0", "", "[/x]", "[bold]x[/bold]", "\x1b[31mred\x1b[0m", "\x1b]0;t\x07", "a\nb",
                   "\ud800", "x" * 100_000, "full", "float16", "nan", "1e400", "ties", "../../etc", "\x00"]


def hostile_value(rng: random.Random, depth: int = 0) -> Any:
    k = rng.randrange(14 if depth < 3 else 9)
    if k == 0:
        return rng.choice(HOSTILE_STRINGS)
    if k == 1:
        return rng.choice([0, 1, -1, 2, 10**9, 2**63, -2**63, 10**30, 10 ** rng.choice([50, 400, 4000])])
    if k == 2:
        return rng.choice([0.0, -0.0, 0.5, 1.5, 1e308, -1e308, float("nan"), float("inf"), float("-inf"), 1e-320])
    if k == 3:
        return rng.choice([True, False])
    if k == 4:
        return None
    if k == 5:
        return []
    if k == 6:
        return {}
    if k == 7:
        return rng.choice(["linear", "ties", "cat", 3, 0.5])
    if k == 8:
        return "y" * rng.choice([1000, 1_000_000])
    if k in (9, 10):
        return [hostile_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["path", "weight", "density", "alpha", "x", "force", "method"]): hostile_value(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def base_recipe(rng: random.Random, inputs: dict[str, Path]) -> dict[str, Any]:
    names = rng.sample(["a", "b", "c", "blink", "clink"], rng.choice([1, 2, 2, 3]))
    method = rng.choice(METHODS)
    cfg: dict[str, Any] = {"method": method}
    if rng.random() < 0.5:
        cfg["inputs"] = [str(inputs[n]) for n in names]
    else:
        cfg["inputs"] = [{"path": str(inputs[n]), "weight": rng.choice([0.5, 1.0, 2.0])} for n in names]
    if method in ("ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs", "della"):
        cfg["params"] = {"density": rng.choice([0.3, 0.5, 0.9])}
        if method == "della":
            cfg["params"]["epsilon"] = 0.1
    if method != "cat" and rng.random() < 0.5:
        cfg["rank"] = rng.choice([1, 2, 4, "full"])
    if rng.random() < 0.3:
        cfg["dtype"] = rng.choice(["float32", "bfloat16", "float16"])
    if any(n in ("c", "clink") for n in names):
        cfg["alpha"] = 4.0
    if rng.random() < 0.3:
        cfg["seed"] = rng.randrange(5)
    if method in ("ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs", "della") and rng.random() < 0.3:
        cfg["svd_niter"] = rng.choice([0, 1, 2, 4])
    return cfg


KEYS = ["inputs", "method", "weights", "params", "rank", "seed", "svd", "svd_niter", "svd_oversample", "dtype", "output",
        "force", "extra_tensors", "allow_nonfinite", "alpha"]


def mutate_recipe(cfg: dict[str, Any], rng: random.Random, inputs: dict[str, Path]) -> dict[str, Any]:
    for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):
        op = rng.randrange(10)
        if op < 4:
            cfg[rng.choice(KEYS)] = hostile_value(rng)
        elif op == 4:
            cfg[rng.choice(["forse", "method ", "x", "__proto__", "[/x]", "\ud800"])] = 1
        elif op == 5 and isinstance(cfg.get("inputs"), list) and cfg["inputs"]:
            i = rng.randrange(len(cfg["inputs"]))
            cfg["inputs"][i] = rng.choice([str(inputs[k]) for k in ("loop", "dangling", "missing", "store")]
                                          + [hostile_value(rng), {"path": hostile_value(rng)}])
        elif op == 6:
            cfg["inputs"] = rng.choice([{str(inputs["a"]): 1}, str(inputs["a"]), 5, [[str(inputs["a"])]], []])
        elif op == 7:
            cfg["force"] = rng.choice(["false", "true", 0, 1, "no", None, True, False])
        elif op == 8:
            cfg["params"] = rng.choice(["density=0.5", [0.5], {"density": "0.5"}, {"density": [0.5, "x"]},
                                        {"density": {"a": 1}}, {"unknown": 1}, {"density": float("nan")}])
        else:
            cfg["svd_niter"] = rng.choice([10**9, 10**18, -1, 2.5, "2", True, 100, 101])
    return cfg


def _yaml_scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            return ".nan" if v != v else ".inf" if v > 0 else "-.inf"
        text = repr(v)
        mant, e, exp = text.partition("e")
        if "." not in mant:  # YAML 1.1 (PyYAML) reads "1e-320" as a string: a float needs a dot
            mant += ".0"
        return mant + (e + exp if e else "")
    if isinstance(v, int):
        return str(v)
    return json.dumps(v)  # a JSON string is a YAML double-quoted scalar (escapes included)


def to_yaml(v: Any, rng: random.Random, anchors: list[str], indent: str = "") -> str:
    """Block/flow YAML by hand (so aliases and anchors can be placed anywhere)."""
    if isinstance(v, dict):
        if not v:
            return "{}"
        parts = []
        for k, x in v.items():
            parts.append(f"{_yaml_scalar(str(k))}: {to_yaml(x, rng, anchors, indent + '  ')}")
        return "{" + ", ".join(parts) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(to_yaml(x, rng, anchors, indent) for x in v) + "]"
    text = _yaml_scalar(v)
    if rng.random() < 0.05:
        name = f"n{len(anchors)}"
        anchors.append(name)
        return f"&{name} {text}"
    if anchors and rng.random() < 0.05:
        return f"*{rng.choice(anchors)}"
    return text


def alias_bomb(rng: random.Random, depth: int) -> str:
    lines = ["b0: &b0 [" + ",".join(["lol"] * 9) + "]"]
    for i in range(1, depth):
        lines.append(f"b{i}: &b{i} [" + ",".join([f"*b{i - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\n{rng.choice(KEYS)}: *b{depth - 1}\n"


def to_toml(cfg: dict[str, Any]) -> str:
    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return "nan" if v != v else "inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v)
        if isinstance(v, int):
            return str(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v if x is not None) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(str(k))} = {val(x)}" for k, x in v.items() if x is not None) + "}"
        return '""'

    return "".join(f"{json.dumps(str(k))} = {val(v)}\n" for k, v in cfg.items() if v is not None)


def render(cfg: dict[str, Any], fmt: str, rng: random.Random) -> bytes:
    if fmt == "json":
        text = json.dumps(cfg, allow_nan=True) if rng.random() < 0.9 else json.dumps(cfg)[:-1] + ', "method": "cat"}'
        if rng.random() < 0.03:
            text = "[" * 100_000 + "]" * 100_000
    elif fmt == "toml":
        text = to_toml(cfg)
        if rng.random() < 0.05:
            text += 'method = "dup"\n'
    else:
        text = "\n".join(f"{_yaml_scalar(str(k))}: {to_yaml(v, rng, [])}" for k, v in cfg.items()) + "\n"
        r = rng.random()
        if r < 0.08:
            text += alias_bomb(rng, rng.choice([2, 4, 9, 12]))
        elif r < 0.12:
            text = text.replace("inputs:", "base: &base " + json.dumps({"method": "ties"}) + "\ninputs:", 1) + "<<: *base\n"
        elif r < 0.14:
            text += f"method: !!python/object/apply:os.system [\"touch {os.devnull}\"]\n"
        elif r < 0.16:
            text += "[" * 20_000 + "]" * 20_000 + "\n"
    try:
        return text.encode("utf-8", "surrogatepass")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


def protected_entries(listed: Any, inroot: Path) -> set[str]:
    """Entries under inroot (relative names, as fingerprint() gives them) that the recipe's inputs read, links
    followed (written here independently of adaptermerge): the input, its folder's weights and config, the config
    beside a weights file."""
    paths = []
    for item in listed if isinstance(listed, list) else []:
        p = item.get("path") if isinstance(item, dict) else item
        if isinstance(p, str) and "\x00" not in p:
            try:
                os.fsencode(p)  # a lone surrogate names no file
            except UnicodeEncodeError:
                continue
            paths.append(p)
    real_in = os.path.realpath(inroot)
    out: set[str] = set()
    for p in paths:
        cands = [p]
        if os.path.isdir(p):
            cands += [os.path.join(p, "adapter_model.safetensors"), os.path.join(p, "adapter_config.json")]
            real = os.path.realpath(p)
            if real.startswith(real_in + os.sep):
                out.add(os.path.relpath(real, real_in) + "/")  # nothing may appear inside an input folder either
        elif os.path.basename(p) == "adapter_model.safetensors":
            cands.append(os.path.join(os.path.dirname(p), "adapter_config.json"))
        for c in cands:
            for q in {c, os.path.realpath(c)}:
                if q.startswith(real_in + os.sep) or q.startswith(str(inroot) + os.sep):
                    out.add(os.path.relpath(q, real_in if q.startswith(real_in + os.sep) else inroot))
    return out


# ---------------------------------------------------------------------------------------------------- one run
def run_one(rng: random.Random, root: Path, inputs: dict[str, Path], previous: Path) -> tuple[str, dict[str, Any]]:
    """One recipe + output, run through main(); returns (outcome tag, record). Raises AssertionError on a finding."""
    work = root / "work"
    if work.exists() or work.is_symlink():
        shutil.rmtree(work)
    work.mkdir()
    fmt = rng.choice(["yaml", "yaml", "toml", "json"])
    cfg = mutate_recipe(base_recipe(rng, inputs), rng, inputs)
    kind = rng.choice(OUTPUT_KINDS)
    out, existed = make_output(kind, work, inputs, previous)
    on_cli = rng.random() < 0.5
    if not on_cli:
        cfg.setdefault("output", str(out))
    cli_force = rng.random() < 0.5
    recipe = work / f"recipe.{fmt}"
    special = rng.random()
    if special < 0.02:
        os.mkfifo(recipe)
    elif special < 0.04:
        recipe.symlink_to("/dev/zero")
    elif special < 0.05:
        with open(recipe, "wb") as f:
            f.truncate(8 << 30)
    else:
        recipe.write_bytes(render(cfg, fmt, rng))
    argv = ["merge", "--config", str(recipe)] + (["-o", str(out)] if on_cli else []) + (["--force"] if cli_force else [])
    argv += [rng.choice(["-q", "--json", "-q", "--json", ""])]
    argv = [a for a in argv if a]
    record = {"argv": argv, "output_kind": kind, "format": fmt}
    if on_cli:
        target: Path | None = out
    elif isinstance(cfg.get("output"), str) and cfg["output"] and "\x00" not in cfg["output"]:
        target = recipe.parent / cfg["output"]
    else:
        target = None
    existed_target = target is not None and os.path.lexists(target)
    before_inputs = fingerprint(root / "in")
    protected = protected_entries(cfg.get("inputs"), root / "in")
    before_work = fingerprint(work, skip=recipe.name)
    out_buf, err_buf = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out_buf), contextlib.redirect_stderr(err_buf):
        code = main(argv)  # an exception here is a finding (caught by the caller)
    err = err_buf.getvalue()
    record.update(code=code, stderr=err[:2000])
    assert code in CODES, f"exit code {code}"
    after_inputs = fingerprint(root / "in")
    changed = sorted(k for k in set(before_inputs) | set(after_inputs) if after_inputs.get(k) != before_inputs.get(k))
    if changed:
        # only an input of *this* merge is protected; the other fixtures may legitimately be an output (with force)
        hit = [k for k in changed if k in protected or any(f.endswith("/") and k.startswith(f) for f in protected)]
        assert not hit, f"an input of this merge changed: {hit[:3]}"
        assert code == 0, f"a failed run changed {changed[:3]}"
        record["rebuild"] = True
    left = [str(p.relative_to(root)) for p in root.rglob(f"{TEMP_PREFIX}*")]
    assert not left, f"temporaries left: {left}"
    assert not any(ord(c) < 32 and c not in "\n" or 0x7f <= ord(c) < 0xa0 for c in err), "raw control character on stderr"
    if code != 0:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line: {err[:500]!r}"
        assert len(lines[0]) <= 4100, f"error line of {len(lines[0])} characters"
        assert fingerprint(work, skip=recipe.name) == before_work, "a failed run changed the output folder"
        return f"exit{code}", record
    # success: a complete, loadable adapter at the output; an existing output only replaced with a real force=True,
    # and only if it was a regular file or an adapter folder
    assert target is not None, "merged without a valid output"
    forced = cli_force or cfg.get("force") is True
    if existed_target:
        assert forced, "an existing output was replaced without force"
        if target == out:
            assert kind in REPLACEABLE, f"output kind {kind} was replaced"
    if kind in ("store", "store_weights", "input_dir", "input_file", "inside_input", "link_to_input", "link_to_store"):
        record["rebuild"] = True
    am.load_adapter(target, alpha=4.0) if target.suffix == ".safetensors" else am.load_adapter(target)
    return "merged", record


def fuzz(minutes: float, seed: int, out: Path, hang_seconds: float, max_iterations: int | None = None,
         report_every: float = 60.0, block_seconds: float = 300.0) -> dict[str, Any]:
    """``hang_seconds`` bounds the CPU time of one iteration (a slow path: independent of how much CPU the other
    jobs on a shared machine leave); ``block_seconds`` bounds its wall-clock time (a blocked open or read uses no
    CPU at all)."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="am-fuzzcfg-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    (root / "in").mkdir()
    inputs = build_inputs(root / "in")
    previous = root / "previous"
    am.merge_to(previous, [inputs["b"]], "linear")

    def on_alarm(signum: int, frame: Any) -> None:
        if signum == signal.SIGPROF:
            raise Hang(f"iteration used more than {hang_seconds} s of CPU")
        raise Hang(f"iteration blocked for more than {block_seconds} s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGPROF, on_alarm)
    findings: dict[str, dict[str, Any]] = {}
    outcomes: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    t0 = time.monotonic()
    deadline = t0 + minutes * 60
    next_report = t0 + report_every
    it = 0
    try:
        while time.monotonic() < deadline and (max_iterations is None or it < max_iterations):
            it += 1
            state = rng.getstate()
            signal.setitimer(signal.ITIMER_PROF, hang_seconds)
            signal.setitimer(signal.ITIMER_REAL, block_seconds)
            record: dict[str, Any] = {}
            try:
                tag, record = run_one(rng, root, inputs, previous)
                if record.get("rebuild"):  # a fixture was (legitimately) replaced: make them all again
                    shutil.rmtree(root / "in")
                    (root / "in").mkdir()
                    inputs = build_inputs(root / "in")
                outcomes[tag] += 1
                kinds[f"{record['output_kind']}:{tag}"] += 1
            except (Exception, Hang) as e:  # noqa: BLE001 - anything else is a finding
                signal.setitimer(signal.ITIMER_PROF, 0)
                signal.setitimer(signal.ITIMER_REAL, 0)
                tb = traceback.extract_tb(e.__traceback__)
                frames = [f for f in tb if "/adaptermerge/" in f.filename] or list(tb)
                key = f"{type(e).__name__} at {Path(frames[-1].filename).name}:{frames[-1].lineno}: {str(e)[:80]}"
                outcomes["FINDING"] += 1
                _record(findings, out, key, state, seed, "".join(traceback.format_exception(e)))
                shutil.rmtree(root / "in")  # whatever happened, start the next iteration from intact fixtures
                (root / "in").mkdir()
                inputs = build_inputs(root / "in")
            finally:
                signal.setitimer(signal.ITIMER_PROF, 0)
                signal.setitimer(signal.ITIMER_REAL, 0)
            if time.monotonic() >= next_report:
                el = time.monotonic() - t0
                print(f"[{el / 60:5.1f} min] {it} iterations, {it / el:.1f}/s, findings {len(findings)}, {dict(outcomes)}", flush=True)
                next_report += report_every
    finally:
        work = root / "work"
        shutil.rmtree(root, ignore_errors=True)
        del work
    elapsed = time.monotonic() - t0
    summary = {
        "seed": seed, "minutes": round(elapsed / 60, 2), "iterations": it, "iterations_per_second": round(it / elapsed, 2),
        "outcomes": dict(outcomes), "findings": {k: v["count"] for k, v in findings.items()},
        "output_kinds": dict(sorted(kinds.items())),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _record(findings: dict, out: Path, key: str, state: Any, seed: int, text: str) -> None:
    if key in findings:
        findings[key]["count"] += 1
        return
    d = out / f"finding-{len(findings):03d}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "state.json").write_text(json.dumps({"seed": seed, "rng_state": [state[0], list(state[1]), state[2]]}))
    (d / "traceback.txt").write_text(f"{key}\n\n{text}")
    findings[key] = {"count": 1, "dir": str(d)}
    print(f"FINDING {key} -> {d}", flush=True)


def replay(d: Path, hang_seconds: float) -> None:
    """Re-run the iteration saved in a finding folder (its random state rebuilds the same recipe and output)."""
    st = json.loads((d / "state.json").read_text())
    rng = random.Random()
    rng.setstate((st["rng_state"][0], tuple(st["rng_state"][1]), st["rng_state"][2]))
    root = Path(tempfile.mkdtemp(prefix="am-fuzzcfg-replay-"))
    try:
        (root / "in").mkdir()
        inputs = build_inputs(root / "in")
        am.merge_to(root / "previous", [inputs["b"]], "linear")
        signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(Hang("hang")))
        signal.setitimer(signal.ITIMER_REAL, hang_seconds)
        print(run_one(rng, root, inputs, root / "previous"))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        shutil.rmtree(root, ignore_errors=True)


def main_(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=1.0)
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("fuzz-config-out"))
    ap.add_argument("--hang-seconds", type=float, default=20.0, help="CPU seconds one iteration may use")
    ap.add_argument("--block-seconds", type=float, default=300.0, help="wall-clock seconds one iteration may take")
    ap.add_argument("--max-memory-gb", type=float, default=4.0)
    ap.add_argument("--report-every", type=float, default=60.0)
    ap.add_argument("--replay", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.max_memory_gb > 0:
        cap = int(args.max_memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    if args.replay is not None:
        replay(args.replay, args.hang_seconds)
        return 0
    summary = fuzz(args.minutes, args.seed, args.out, args.hang_seconds, args.iterations, args.report_every,
                   args.block_seconds)
    print(json.dumps({k: v for k, v in summary.items() if k != "output_kinds"}, indent=2))
    return 1 if summary["findings"] else 0


if __name__ == "__main__":
    sys.exit(main_())
