"""A hostile user's view: symlinks, special files, hostile configs, races, signals, hostile text.

One test (or a parametrized family) per class of defect in docs/reliability.md ("Links, special files, configs,
races and signals"). Symlinks, FIFOs, device nodes, the race and the signal are real, in the test's own folder:
nothing is simulated except *when* the second merge of the race runs (a hook runs it just before the first one's
final rename) and *when* Ctrl-C arrives (the merge sends SIGINT to itself when it reaches its second module).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import adaptermerge as am
import adaptermerge.adapter as am_adapter
from conftest import read_deltas, write_adapter
import test_hardening
from test_hardening import KA, KB, SMALL, adapter_dir, cli, one_line, raw_safetensors, run_child, snapshot, valid_parts  # noqa: F401

alarm = test_hardening.alarm  # the fixture, shared with test_hardening

ESC = "\x1b"


def tree(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every regular file (size and mtime for sparse giants), '<dir>', or the type of a
    special file and a link's target, links not followed: a FIFO must stay a FIFO, a link must stay that link."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = os.lstat(p)
        rel = str(p.relative_to(root))
        if stat.S_ISDIR(st.st_mode):
            out[rel] = "<dir>"
        elif stat.S_ISREG(st.st_mode):
            out[rel] = f"<{st.st_size} bytes, {st.st_mtime_ns}>" if st.st_size > 1 << 26 else hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = f"<{stat.S_IFMT(st.st_mode):o}:{os.readlink(p) if p.is_symlink() else ''}>"
    return out


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".adaptermerge-tmp-*"))


# ------------------------------------------------------------------------------------------------ 1. --force vs inputs
def _store_layout(tmp: Path) -> tuple[Path, Path]:
    """store/ holds the real weights; a/ is an adapter folder whose weights file is a link into store/."""
    store = tmp / "store"
    real = write_adapter(tmp / "real", SMALL, r=2, alpha=4)
    store.mkdir()
    os.replace(real / "adapter_model.safetensors", store / "weights.safetensors")
    a = tmp / "a"
    a.mkdir()
    (a / "adapter_model.safetensors").symlink_to(store / "weights.safetensors")
    os.replace(real / "adapter_config.json", a / "adapter_config.json")
    return a, store


@pytest.mark.parametrize("interface", ["cli", "api"])
@pytest.mark.parametrize("case", ["weights_link_store", "weights_link_target_file", "bare_link_store", "config_link_store",
                                  "input_dir_link", "output_link_to_input"])
def test_force_never_touches_an_input_reached_through_links(tmp_path, capsys, case, interface):
    b = write_adapter(tmp_path / "b", SMALL, r=2, alpha=4, seed=1)
    a, store = _store_layout(tmp_path)
    inputs, out = [a, b], store
    if case == "weights_link_target_file":
        out = store / "weights.safetensors"
    elif case == "bare_link_store":
        (tmp_path / "bare.safetensors").symlink_to(store / "weights.safetensors")
        inputs = [tmp_path / "bare.safetensors", b]
    elif case == "config_link_store":  # real weights in a/, only the config is a link into store/
        (a / "adapter_model.safetensors").unlink()
        os.replace(store / "weights.safetensors", a / "adapter_model.safetensors")
        os.replace(a / "adapter_config.json", store / "cfg.json")
        (a / "adapter_config.json").symlink_to(store / "cfg.json")
    elif case == "input_dir_link":
        (tmp_path / "alink").symlink_to(b, target_is_directory=True)
        inputs, out = [tmp_path / "alink"], b
    elif case == "output_link_to_input":
        (tmp_path / "o").symlink_to(b, target_is_directory=True)
        inputs, out = [b], tmp_path / "o"
    before = tree(tmp_path)
    if interface == "cli":
        code, _, err = cli(capsys, "merge", *inputs, "-o", out, "--force", "--alpha", "4")
        msg = one_line(err)
        assert code == 2, err
    else:
        with pytest.raises(am.ParameterError) as info:
            am.merge_to(out, [am.load_adapter(p, alpha=4) if Path(p).is_file() else p for p in inputs], force=True)
        msg = str(info.value)
    assert re.search(r"output .* (is inside|contains) input", msg), msg
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------------------------ 2. special files
def _special(kind: str, path: Path, tmp: Path) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "chardev":
        if os.geteuid() != 0:
            pytest.skip("creating a device node (mknod) needs root")
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # the same device as /dev/null
    elif kind == "socket":
        import socket

        s, cwd = socket.socket(socket.AF_UNIX), os.getcwd()
        os.chdir(path.parent)  # a relative name: socket paths are limited to 108 bytes
        try:
            s.bind(path.name)
        finally:
            os.chdir(cwd)
            s.close()
    elif kind == "link_to_fifo":
        os.mkfifo(tmp / "fifo-target")
        path.symlink_to(tmp / "fifo-target")
    elif kind == "dangling_link":
        path.symlink_to(tmp / "nothing-here")
    elif kind == "link_loop":
        path.symlink_to(path)


@pytest.mark.parametrize("output", ["dir", "file"])
@pytest.mark.parametrize("kind", ["fifo", "chardev", "socket", "link_to_fifo", "dangling_link", "link_loop"])
def test_force_replaces_only_regular_files_and_adapter_folders(tmp_path, capsys, alarm, kind, output):
    a = write_adapter(tmp_path / "a", SMALL, r=2, alpha=4)
    out = tmp_path / ("out" if output == "dir" else "out.safetensors")
    _special(kind, out, tmp_path)
    before = tree(tmp_path)
    code, _, err = cli(capsys, "merge", a, "-o", out, "--force")
    msg = one_line(err)
    assert code == 5, err
    want = {"fifo": "is a FIFO", "chardev": "is a character device", "socket": "is a socket", "link_to_fifo": "is a FIFO",
            "dangling_link": "symbolic link to nothing", "link_loop": "cannot examine the existing output: Too many levels"}[kind]
    assert msg.startswith(f"error: {out} ") or msg.startswith(f"error: {out}:"), msg
    assert want in msg, msg
    assert tree(tmp_path) == before  # the node is still there, same type; nothing parked under a temporary name
    assert temps(tmp_path) == []


# ------------------------------------------------------------------------------------------------ 3. small text files
@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "sparse_8g", "directory"])
@pytest.mark.parametrize("which", ["adapter_config", "merge_config"])
def test_small_text_files_are_read_safely(tmp_path, capsys, alarm, kind, which):
    a = write_adapter(tmp_path / "a", SMALL, r=2, alpha=4)
    target = a / "adapter_config.json" if which == "adapter_config" else tmp_path / "recipe.yaml"
    if target.exists():
        target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "dev_zero":
        target.symlink_to("/dev/zero")
    elif kind == "directory":
        target.mkdir()
    else:
        with open(target, "wb") as f:
            f.truncate(8 << 30)  # a hole: no disk used
    before = tree(tmp_path)
    runs = [["merge", a, "-o", tmp_path / "out"], ["inspect", a]] if which == "adapter_config" else \
        [["merge", "--config", target, "-o", tmp_path / "out"]]
    for argv in runs:
        code, _, err = cli(capsys, *argv)
        msg = one_line(err)
        assert code == 3, err
        want = {"fifo": "not a regular file (a FIFO, socket or device)", "dev_zero": "not a regular file",
                "directory": "is a directory", "sparse_8g": "file of 8589934592 bytes exceeds the"}[kind]
        assert msg.startswith(f"error: {target}: ") and want in msg, msg
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------------------------ 4. YAML aliases
def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path, capsys):
    a = write_adapter(tmp_path / "a", SMALL, r=2, alpha=4)
    levels = ["a0: &a0 [" + ",".join(["x" * 8] * 9) + "]"]
    for i in range(1, 9):
        levels.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"inputs: [{a}]\n" + "\n".join(levels) + "\nmethod: *a8\n")  # 9^9 = 387 million strings
    code, _, err = cli(capsys, "merge", "--config", bomb, "-o", tmp_path / "out")
    msg = one_line(err)
    assert code == 3, err
    assert msg.startswith(f"error: {bomb}: cannot parse config: YAML aliases (*a0) are not allowed"), msg
    assert len(msg) < 400
    # an alias is refused even when it is harmless (a merge key, a repeated value): there is no safe amount
    small = tmp_path / "small.yaml"
    small.write_text(f"inputs: [&p {a}, *p]\n")
    code, _, err = cli(capsys, "merge", "--config", small, "-o", tmp_path / "out")
    assert code == 3 and "YAML aliases (*p) are not allowed" in one_line(err)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ 5. Ctrl-C
SIGINT_DRIVER = """
import os, signal, sys
import adaptermerge.engine as engine
from adaptermerge.cli import main
real, calls = engine._merge_module, []
def interrupted(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGINT)  # a real signal, delivered in the middle of the merge
    return real(*args, **kwargs)
engine._merge_module = interrupted
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("output", ["new/deeper/out", "new/deeper/out.safetensors"])
def test_ctrl_c_exits_130_and_leaves_nothing(tmp_path, output):
    a = write_adapter(tmp_path / "a", r=4)
    b = write_adapter(tmp_path / "b", r=4, seed=1)
    before = tree(tmp_path)
    r = subprocess.run([sys.executable, "-c", SIGINT_DRIVER, "merge", str(a), str(b), "-o", str(tmp_path / output),
                        "--method", "ties", "--density", "0.5"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)})
    assert r.returncode == 130, r.stderr
    assert one_line(r.stderr) == "error: interrupted (Ctrl-C)"
    assert "Traceback" not in r.stderr
    assert tree(tmp_path) == before  # no output, no temporary, and the folders made for the output are gone


# ------------------------------------------------------------------------------------------------ 6. plain text
def _hostile_names(tmp: Path) -> Path:
    """An adapter whose tensor names, metadata, config and folder name hold markup and terminal escape codes."""
    d = tmp / "in [" / "x] [bold]"  # the path reads 'in [/x] [bold]'
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    mod = f"base_model.model.layers.0.[/x]{ESC}[31m.q_proj"
    tensors = {f"{mod}.lora_A.weight": torch.randn(2, 6, generator=g), f"{mod}.lora_B.weight": torch.randn(8, 2, generator=g),
               "base_model.model.extra.[/]": torch.ones(2)}
    save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt", "note [/x]": f"[bold]{ESC}]0;title\x07"})
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "base_model_name_or_path": "[/x] [link=file:///etc]",
           "rank_pattern": {"[/x]": 2}, "alpha_pattern": {}}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def test_text_from_files_is_printed_as_plain_text(tmp_path, capsys):
    d = _hostile_names(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    for f in d.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    runs = {
        "inspect": ["inspect", d],
        "merge": ["merge", d, other, "--method", "ties", "--density", "0.5", "-o", tmp_path / "out [/x]"],
        "analyze": ["analyze", d, other, "--preview-method", "ties", "--density", "0.5"],
    }
    for name, argv in runs.items():
        code, out, err = cli(capsys, *argv)
        assert code == 0, (name, err)
        text = out + err
        assert "Traceback" not in text and "MarkupError" not in text
        assert ESC not in text and "\x07" not in text, name  # escape codes are shown escaped, never emitted
        assert "\\x1b" in text or name == "merge", name  # (the merge summary shows no module names)
        assert "[/x]" in text, name  # shown literally, not eaten as a closing tag
    code, out, _ = cli(capsys, "inspect", d)
    assert "[bold]\\x1b]0;title\\x07" in out and "[/x] [link=file:///etc]" in out


# ------------------------------------------------------------------------------------------------ 7. config types
CONFIG_TYPE_CASES = {
    "force_string": ("force: 'false'", r"config force must be true or false, got 'false' \(str\)"),
    "allow_nonfinite_string": ("allow_nonfinite: 'false'", r"config allow_nonfinite must be true or false, got 'false'"),
    "params_string": ("params: density=0.5", r"config params must be a mapping of parameter names to values, got 'density=0\.5'"),
    "params_list": ("params: [1, 2]", r"config params must be a mapping .*, got \[1, 2\] \(list\)"),
    "param_value_mapping": ("params: {density: {a: 1}}", r"config params\.density must be a finite number, a string, true/false or a list"),
    "inputs_int": ("inputs: 5", r"config inputs must be a list of paths .*, got 5 \(int\)"),
    "inputs_mapping": ("inputs: {a: 1, b: 2}", r"config inputs must be a list .*, got \{'a': 1, 'b': 2\} \(dict\)"),
    "input_path_int": ("inputs: [{path: 3}]", r"config inputs\[0\] must be a path \(a string\) or a mapping"),
    "input_weight_string": ("inputs: [{path: a, weight: heavy}]", r"config inputs\[0\]\.weight must be a finite number, got 'heavy'"),
    "dtype_list": ("dtype: [float16]", r"config dtype must be a string, got \['float16'\] \(list\)"),
    "alpha_string": ("alpha: '16'", r"config alpha must be a finite number, got '16' \(str\)"),
    "weights_string": ("weights: '1,2'", r"config weights must be a list of numbers, got '1,2'"),
    "output_list": ("output: [1, 2]", r"config output must be a string \(a path\), got \[1, 2\] \(list\)"),
    "seed_float": ("seed: 1.5", r"config seed must be an integer, got 1\.5"),
    "rank_bool": ("rank: true", r"config rank must be a positive integer or 'full', got True"),
    "svd_niter_huge": ("svd_niter: 1000000000", r"svd_niter must be an integer in \[0, 100\], got 1000000000"),
    "huge_value_echo": ("method: " + "x" * 200_000, r"unknown method 'x{20,}…"),
}


@pytest.mark.parametrize("fmt", ["yaml", "json", "toml"])
@pytest.mark.parametrize("case", list(CONFIG_TYPE_CASES))
def test_config_values_are_strictly_typed(tmp_path, capsys, case, fmt):
    import yaml

    a = write_adapter(tmp_path / "a", SMALL, r=2, alpha=4)
    out = write_adapter(tmp_path / "out", SMALL, r=2, alpha=4, seed=7)  # an existing output that must survive
    line, pattern = CONFIG_TYPE_CASES[case]
    data = {"inputs": [str(a)], "output": str(out), **yaml.safe_load(line)}
    path = tmp_path / f"recipe.{fmt}"
    if fmt == "yaml":
        path.write_text(yaml.safe_dump(data))
    elif fmt == "json":
        path.write_text(json.dumps(data))
    else:
        path.write_text(_toml(data))
    before = tree(tmp_path)
    code, _, err = cli(capsys, "merge", "--config", path)
    msg = one_line(err)
    assert code == 2, err
    assert re.search(pattern, msg), msg
    assert len(msg) < 600
    assert tree(tmp_path) == before


def _toml(data: dict) -> str:
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {val(x)}" for k, x in v.items()) + "}"
        raise TypeError(v)

    return "".join(f"{k} = {val(v)}\n" for k, v in data.items())


def test_api_flags_are_strict_bools(tmp_path):
    a = write_adapter(tmp_path / "a", SMALL, r=2, alpha=4)
    out = write_adapter(tmp_path / "out", SMALL, r=2, alpha=4, seed=7)
    before = tree(tmp_path)
    for kwargs, pattern in (({"force": "false"}, r"force must be true or false, got 'false'"),
                            ({"force": True, "allow_nonfinite": "no"}, r"allow_nonfinite must be true or false, got 'no'")):
        with pytest.raises(am.ParameterError, match=pattern):
            am.merge_to(out, [a], **kwargs)
    with pytest.raises(am.ParameterError, match=r"alpha must be a finite number, got 'x'"):
        am.load_adapter(a, alpha="x")
    with pytest.raises(am.ParameterError, match=r"density: 1000+… is too large"):
        am.merge_to(out, [a], "ties", density=10**400, force=True)
    with pytest.raises(am.ParameterError, match=r"weights: <int of 16610 bits> is too large"):
        am.merge_to(out, [a], "linear", [10**5000], force=True)
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------------------------ 8. memory, whole module
MEMORY_DRIVER = """
import io, json, sys, contextlib
from adaptermerge.cli import main
res = {}
for name, argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
        res[name] = [code, err.getvalue()]
    except BaseException as e:  # MemoryError: the bug this test is about
        res[name] = [type(e).__name__, str(e)[:300]]
print(json.dumps(res))
"""


def test_memory_check_covers_the_whole_module(tmp_path):
    """A sparse input whose lora_A is 1.2 GiB (40 % of a 3 GiB address-space cap): one tensor fits, but the merge
    (float32 scaled copies, float64 stacks, the concatenation) and inspect (float64 copies) need several times
    that. Each must be refused from the header, naming the module, instead of a MemoryError or the OOM killer."""
    n = int(1.2 * 2**30) // 4
    header = {KA: {"dtype": "F32", "shape": [1, n], "data_offsets": [0, 4 * n]},
              KB: {"dtype": "F32", "shape": [8, 1], "data_offsets": [4 * n, 4 * n + 32]}}
    d = adapter_dir(tmp_path / "sparse", raw_safetensors(header, b""), config={"r": 1, "lora_alpha": 1})
    with open(d / "adapter_model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) + 4 * n + 32)
    jobs = [["linear", ["merge", str(d), "-o", str(tmp_path / "o1")]],
            ["cat", ["merge", str(d), str(d), "--method", "cat", "-o", str(tmp_path / "o2")]],
            ["inspect", ["inspect", str(d)]]]
    factor_form = {"tsv_m": ["--method", "tsv_m"], "iso_c": ["--method", "iso_c"], "iso_cts": ["--method", "iso_cts"],
                   "knots": ["--method", "knots"], "ties_core": ["--method", "ties", "-p", "space=core"]}
    jobs += [[name, ["merge", str(d), str(d), *flags, "-o", str(tmp_path / f"o-{name}")]] for name, flags in factor_form.items()]
    r = run_child(MEMORY_DRIVER.replace("sys.argv[1]", repr(json.dumps(jobs))),
                  preexec_fn=lambda: __import__("resource").setrlimit(__import__("resource").RLIMIT_AS, (3 << 30, 3 << 30)))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    for name in ("linear", "cat", "inspect", *factor_form):  # the factor-form and Core-Space estimates too
        code, err = res[name]
        assert code == 3, res[name]
        assert re.search(r"module '.*q_proj'.* needs about [0-9.]+ GiB of memory.*more than the 3\.0 GiB", one_line(err)), err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert not any((tmp_path / f"o-{name}").exists() for name in factor_form)


# ------------------------------------------------------------------------------------------------ 9. race
@pytest.mark.parametrize("output", ["out", "out.safetensors"])
def test_an_output_that_appears_during_the_merge_is_not_replaced(tmp_path, capsys, monkeypatch, output):
    """Two merges into the same new path without --force: the second (run for real, to completion, just before
    the first one's final rename) wins the name; the first must refuse (exit 5) instead of silently replacing it."""
    a = write_adapter(tmp_path / "a", SMALL, r=2, alpha=4)
    b = write_adapter(tmp_path / "b", SMALL, r=2, alpha=4, seed=1)
    out = tmp_path / "d" / output
    real_place = am_adapter._place
    other = {}

    def race(src, dst, **kw):
        if not other:
            other["started"] = True
            am.merge_to(dst, [b], "linear")  # the concurrent merge finishes first
            other["bytes"] = {k: v for k, v in snapshot(dst.parent).items() if not k.startswith(".adaptermerge-tmp-")}
        return real_place(src, dst, **kw)

    monkeypatch.setattr(am_adapter, "_place", race)
    code, _, err = cli(capsys, "merge", a, "-o", out)
    msg = one_line(err)
    assert code == 5, err
    assert msg == f"error: {out} appeared while this merge ran (another merge?); not replacing it: pass --force to replace it"
    assert snapshot(out.parent) == other["bytes"]  # the other merge's output, intact
    assert temps(tmp_path) == []
    if output == "out":
        got, want = read_deltas(out), read_deltas(b)
        assert all(torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6) for k in want)


@pytest.mark.parametrize("native", [True, False])
def test_no_replace_rename(tmp_path, monkeypatch, native):
    """The rename behind the check: renameat2(RENAME_NOREPLACE), and the link / exclusive-mkdir fallback."""
    if not native:
        monkeypatch.setattr(am_adapter, "_renameat2", lambda a, b, flags: False)
    for kind in ("file", "dir"):
        src, dst = tmp_path / f"{kind}-src", tmp_path / f"{kind}-dst"
        if kind == "file":
            src.write_bytes(b"new")
            dst.write_bytes(b"old")
        else:
            src.mkdir()
            (src / "x").write_bytes(b"new")
            dst.mkdir()  # even an empty folder is an output that exists
        with pytest.raises(FileExistsError):
            am_adapter._rename_noreplace(src, dst)
        assert src.exists() and (dst.read_bytes() == b"old" if kind == "file" else list(dst.iterdir()) == [])
        (dst.unlink() if kind == "file" else dst.rmdir())
        am_adapter._rename_noreplace(src, dst)
        assert not src.exists() and (dst.read_bytes() == b"new" if kind == "file" else (dst / "x").read_bytes() == b"new")


# ------------------------------------------------------------------------------------------------ 10. module structure
def _tensors(**shapes: tuple[int, int]) -> bytes:
    header, data, off = {}, b"", 0
    for key, shape in shapes.items():
        raw = torch.ones(shape).numpy().tobytes()
        header[f"base_model.model.m.q.{key}"] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        data += raw
        off += len(raw)
    return raw_safetensors(header, data)


@pytest.mark.parametrize("case", ["both_kinds", "zero_out", "zero_in"])
def test_module_structure_is_unambiguous(tmp_path, capsys, case):
    shapes = {
        "both_kinds": {"lora_A.weight": (2, 6), "lora_B.weight": (8, 2), "lora_embedding_A": (2, 6), "lora_embedding_B": (8, 2)},
        "zero_out": {"lora_A.weight": (2, 6), "lora_B.weight": (0, 2)},
        "zero_in": {"lora_A.weight": (2, 0), "lora_B.weight": (8, 2)},
    }[case]
    d = adapter_dir(tmp_path / "bad", _tensors(**shapes), config={"r": 2, "lora_alpha": 2})
    before = tree(tmp_path)
    pattern = {"both_kinds": r"module 'base_model\.model\.m\.q' has both lora_A/lora_B and lora_embedding_A/lora_embedding_B tensors",
               "zero_out": r"module 'base_model\.model\.m\.q' has zero width: lora_A \[2, 6\], lora_B \[0, 2\]",
               "zero_in": r"module 'base_model\.model\.m\.q' has zero width: lora_A \[2, 0\], lora_B \[8, 2\]"}[case]
    for argv in (["merge", d, "-o", tmp_path / "out"], ["inspect", d]):
        code, _, err = cli(capsys, *argv)
        assert code == 3, err
        assert re.search(pattern, one_line(err)), err
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------------------------ 11. rank_pattern cost
def test_rank_pattern_keys_are_compiled_once(tmp_path, monkeypatch):
    """300 modules x 300 keys: each key compiled exactly once (not once per module through re's 512-entry cache)
    and the first matching key (PEFT's rule) decides each module's rank and alpha."""
    n = 300
    mods = {f"model.layers.{i}.proj": (3, 2) for i in range(n)}
    rank_pattern = {f"layers\\.{i}\\.proj": 1 + (i % 3) for i in range(n)}
    alpha_pattern = {"layers\\.1.*": 5.0, **{f"layers\\.{i}\\.proj": float(i + 1) for i in range(n)}}
    d = write_adapter(tmp_path / "a", mods, r=1, alpha=1, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    compiled: list[str] = []
    real_re = am_adapter.re

    class CountingRe:
        error = real_re.error
        Pattern = real_re.Pattern

        @staticmethod
        def compile(p, *args):
            compiled.append(p)
            return real_re.compile(p, *args)

        @staticmethod
        def match(*args, **kwargs):
            raise AssertionError("re.match with a pattern string: recompiled through the cache")

        escape = staticmethod(real_re.escape)

    monkeypatch.setattr(am_adapter, "re", CountingRe)
    ad = am.load_adapter(d)
    assert len(compiled) == len(rank_pattern) + len(alpha_pattern)
    for i in range(n):
        m = ad.modules[f"base_model.model.model.layers.{i}.proj"]
        alpha = 5.0 if str(i).startswith("1") else float(i + 1)  # 'layers\.1.*' comes first and wins
        assert (m.rank, m.alpha, m.scale) == (1 + i % 3, alpha, alpha / (1 + i % 3))


# ------------------------------------------------------------------------------------------------ 12. surrogates, loops
@pytest.mark.parametrize("where", ["tensor_name", "metadata", "config"])
def test_lone_surrogates_are_refused_in_one_line(tmp_path, capsys, where):
    header, data = valid_parts()
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
    if where == "tensor_name":
        header[KA.replace("q_proj", "q_proj\ud800")] = header.pop(KA)
        header[KB.replace("q_proj", "q_proj\ud800")] = header.pop(KB)
    elif where == "metadata":
        header["__metadata__"]["x"] = "\udfff"
    else:
        cfg["base_model_name_or_path"] = "\ud800"
    h = json.dumps(header, separators=(",", ":")).encode()  # ensure_ascii: "\ud800" as a valid JSON escape
    d = adapter_dir(tmp_path / "bad", struct.pack("<Q", len(h)) + h + data, config=json.dumps(cfg))
    good = adapter_dir(tmp_path / "good")
    before = tree(tmp_path)
    f = d / ("adapter_config.json" if where == "config" else "adapter_model.safetensors")
    for argv in (["merge", good, d, "--method", "ties", "--density", "0.5", "-o", tmp_path / "out"], ["inspect", d],
                 ["analyze", good, d]):
        code, _, err = cli(capsys, *argv)
        assert code == 3, err
        assert re.search(rf"^error: {re.escape(str(f))}: .*lone surrogate", one_line(err)), err
    assert tree(tmp_path) == before


def test_symlink_loops_are_clean_errors(tmp_path, capsys):
    a = adapter_dir(tmp_path / "a")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    (tmp_path / "wloop").mkdir()
    (tmp_path / "wloop" / "adapter_model.safetensors").symlink_to(tmp_path / "wloop" / "adapter_model.safetensors")
    (tmp_path / "wloop" / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 4}')
    before = tree(tmp_path)
    for argv, code_want, pattern in (
        (["merge", loop, "-o", tmp_path / "o"], 3, rf"{re.escape(str(loop))}: (a symbolic link that cannot be followed|cannot open: Too many levels of symbolic links)"),
        (["merge", tmp_path / "wloop", "-o", tmp_path / "o"], 3, r"adapter_model\.safetensors: cannot open: Too many levels of symbolic links"),
        (["inspect", loop], 3, r"a symbolic link that cannot be followed|cannot open: Too many levels of symbolic links"),
        (["merge", a, "-o", loop], 5, rf"{re.escape(str(loop))} already exists"),
        (["merge", a, "-o", loop, "--force"], 5, r"cannot examine the existing output: Too many levels of symbolic links"),
        (["merge", a, "-o", loop / "sub", "--force"], 5, r"cannot create output folder|is a file, not a folder|Too many levels"),
    ):
        code, _, err = cli(capsys, *argv)
        assert code == code_want, (argv, err)
        assert "Traceback" not in err and re.search(pattern, one_line(err)), (argv, err)
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------------------------ 13. huge alpha / factors
def test_huge_alpha_and_huge_factors_name_the_file(tmp_path, capsys):
    good = adapter_dir(tmp_path / "good")
    huge_alpha = adapter_dir(tmp_path / "alpha", config={"peft_type": "LORA", "r": 2, "lora_alpha": 1e300})
    g = torch.Generator().manual_seed(0)
    big = tmp_path / "big"
    big.mkdir()
    save_file({KA: torch.randn(2, 6, generator=g) * 1e20, KB: torch.randn(8, 2, generator=g) * 1e20},
              str(big / "adapter_model.safetensors"), metadata={"format": "pt"})
    (big / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    before = tree(tmp_path)
    for argv in (["merge", good, huge_alpha, "-o", tmp_path / "o"], ["merge", good, huge_alpha, "--method", "ties", "--density", "0.5", "-o", tmp_path / "o"],
                 ["analyze", good, huge_alpha], ["inspect", huge_alpha]):
        code, _, err = cli(capsys, *argv)
        msg = one_line(err)
        assert code == 3, (argv, err)
        assert msg.startswith(f"error: {huge_alpha}: module '") and "lora_alpha 1e+300) does not fit float32" in msg, msg
        assert "allow-nonfinite" not in msg
    for argv in (["merge", good, big, "--method", "ties", "--density", "0.5", "-o", tmp_path / "o"],
                 ["analyze", good, big, "--preview-method", "ties", "--density", "0.5"]):
        code, _, err = cli(capsys, *argv)
        msg = one_line(err)
        assert code == 3, (argv, err)
        assert msg.startswith(f"error: {big}: module '") and "overflows float32" in msg, msg
    code, out, err = cli(capsys, "analyze", good, big, "--json")  # the statistics themselves are float64: no error
    assert code in (0, 3) and "Traceback" not in err, err
    if code == 0:
        json.loads(out, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------------------------ 14. capped lines
@pytest.mark.parametrize("case", ["peft_type", "dtype", "shape", "tensor_name", "config_key", "rank_pattern_key"])
def test_error_lines_are_capped(tmp_path, capsys, case):
    header, data = valid_parts()
    cfg: dict = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
    huge = "Z" * 5_000_000
    if case == "peft_type":
        cfg["peft_type"] = huge
    elif case == "dtype":
        header[KA]["dtype"] = huge
    elif case == "shape":
        header[KA]["shape"] = [1] * 1_000_000
    elif case == "tensor_name":
        header[huge + ".lora_A.weight"] = header.pop(KA)
    elif case == "config_key":
        cfg["rank_pattern"] = {huge[:300_000] + "(": 2}
    else:
        cfg["rank_pattern"] = {"q_proj": huge}
    d = adapter_dir(tmp_path / "bad", raw_safetensors(header, data), config=cfg)
    code, _, err = cli(capsys, "merge", d, "-o", tmp_path / "out")
    msg = one_line(err)
    assert code == 3, err[:500]
    assert len(msg) <= 4100 and msg.startswith(f"error: {d}"), msg[:300]
    if case != "tensor_name":
        assert len(msg) < 400, msg[:500]


# ------------------------------------------------------------------------------------------------ 15. leftovers, stdout, JSON
def test_a_failed_run_removes_the_folders_it_created(tmp_path, capsys):
    good = write_adapter(tmp_path / "a", SMALL, r=2, alpha=4)
    header, data = valid_parts()
    nan = bytearray(data)
    nan[0:4] = struct.pack("<f", math.nan)  # found only when the module's tensors are read, after planning
    bad = adapter_dir(tmp_path / "bad", raw_safetensors(header, bytes(nan)))
    before = tree(tmp_path)
    for out in (tmp_path / "new" / "deeper" / "out", tmp_path / "new" / "out.safetensors"):
        code, _, err = cli(capsys, "merge", good, bad, "-o", out)
        assert code == 3 and "contains NaN or Inf" in one_line(err), err
        assert tree(tmp_path) == before


STDOUT_CASES = {
    "merge_json": (["merge", "A", "-o", "OUT", "--json"], 5, r"^error: standard output: write failed: No space left on device \(the merged adapter was written to .*/out\)$"),
    "inspect_json": (["inspect", "A", "--json"], 5, r"^error: standard output: write failed: No space left on device$"),
    "inspect_table": (["inspect", "A"], 5, r"^error: standard output: write failed: No space left on device$"),
    "methods_json": (["methods", "--json"], 5, r"^error: standard output: write failed"),
    "analyze_json": (["analyze", "A", "A", "--json"], 5, r"^error: standard output: write failed"),
}


@pytest.mark.parametrize("case", list(STDOUT_CASES))
def test_a_failing_stdout_is_one_line_and_exit_5(tmp_path, case):
    a = write_adapter(tmp_path / "a", SMALL, r=2, alpha=4)
    argv, code_want, pattern = STDOUT_CASES[case]
    argv = [str(a) if x == "A" else str(tmp_path / "out") if x == "OUT" else x for x in argv]
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "adaptermerge", *argv], stdout=full, stderr=subprocess.PIPE, text=True,
                           timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == code_want, r.stderr
    assert re.search(pattern, one_line(r.stderr)), r.stderr
    if case == "merge_json":
        got, want = read_deltas(tmp_path / "out"), read_deltas(a)
        assert all(torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6) for k in want)


def test_inspect_json_has_no_bare_nan(tmp_path, capsys):
    header, data = valid_parts()
    nan = bytearray(data)
    nan[0:4] = struct.pack("<f", math.nan)
    d = adapter_dir(tmp_path / "nan", raw_safetensors(header, bytes(nan)))
    code, out, err = cli(capsys, "inspect", d, "--json")
    assert code == 0, err

    def refuse(name):
        raise AssertionError(f"bare {name} in JSON output")

    info = json.loads(out, parse_constant=refuse)
    norms = {m["module"]: m["delta_norm"] for m in info["modules"]}
    assert norms[KA.removesuffix(".lora_A.weight")] is None
    assert all(isinstance(v, float) and math.isfinite(v) for k, v in norms.items() if k != KA.removesuffix(".lora_A.weight"))


def test_duplicate_keys_are_refused(tmp_path, capsys):
    header, data = valid_parts()
    h = json.dumps(header, separators=(",", ":"))
    dup = h[:-1] + "," + json.dumps(KA) + ":" + json.dumps(header[KA]) + "}"  # KA twice, the same entry
    raw = dup.encode()
    d = adapter_dir(tmp_path / "dup", struct.pack("<Q", len(raw)) + raw + data)
    c = adapter_dir(tmp_path / "dupcfg", config='{"r": 2, "lora_alpha": 4, "r": 3}')
    for path, pattern in ((d, rf"{re.escape(str(d / 'adapter_model.safetensors'))}: safetensors header names '{re.escape(KA)}' twice"),
                          (c, rf"{re.escape(str(c / 'adapter_config.json'))}: key 'r' appears twice")):
        for argv in (["merge", path, "-o", tmp_path / "out"], ["inspect", path]):
            code, _, err = cli(capsys, *argv)
            assert code == 3, err
            assert re.search(pattern, one_line(err)), err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ the fuzzer itself
def test_config_fuzzer_runs_clean(tmp_path):
    """A short run of benchmarks/fuzz_config.py (fixed seed): the harness works and finds nothing."""
    import importlib.util
    import signal

    spec = importlib.util.spec_from_file_location("fuzz_config", Path(__file__).parents[1] / "benchmarks" / "fuzz_config.py")
    fz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fz)
    old = signal.getsignal(signal.SIGALRM), signal.getsignal(signal.SIGPROF)
    try:
        summary = fz.fuzz(5.0, seed=3, out=tmp_path / "fz", hang_seconds=60, max_iterations=40, report_every=1e9)
    finally:
        signal.signal(signal.SIGALRM, old[0])
        signal.signal(signal.SIGPROF, old[1])
    assert summary["iterations"] == 40
    assert summary["findings"] == {}, summary["findings"]
    assert sum(summary["outcomes"].values()) == 40 and len(summary["outcomes"]) >= 3  # several outcomes exercised


def test_single_file_format_outputs_refuse_special_files(tmp_path, alarm):
    """GGUF / kohya / diffusers single-file outputs go through their own check: a FIFO there is refused too."""
    from adaptermerge.formats.gguf_io import check_file_output

    fifo = tmp_path / "out.gguf"
    os.mkfifo(fifo)
    with pytest.raises(am.OutputError, match=r"out\.gguf is a FIFO, not a regular file or an adapter directory"):
        check_file_output(fifo, force=True, inputs=[], create_parent=False)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_input_path_too_long_is_a_clean_error(tmp_path, capsys):
    """A 1 MB path (found by the recipe fuzzer: the Hub-id check's exists() raised ENAMETOOLONG)."""
    long = tmp_path / ("y" * 300)
    for argv in (["merge", long, "-o", tmp_path / "o"], ["inspect", long], ["merge", tmp_path / ("y" * 1_000_000), "-o", tmp_path / "o"]):
        code, _, err = cli(capsys, *argv)
        assert code == 3, err[:300]
        assert "File name too long" in one_line(err) and len(one_line(err)) <= 4100
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ format-layer sinks
def test_format_sinks_protect_every_inputs_real_location(tmp_path):
    """The GGUF file check and the pipeline-folder check protect inputs like the engine's writer: an input folder's
    config file is never a GGUF output, and a pipeline folder holding an input's real weights (reached through a
    link inside the input folder) is never replaced, even with force."""
    from adaptermerge.formats.gguf_io import check_file_output
    from adaptermerge.formats.sinks import check_pipeline_target

    a = write_adapter(tmp_path / "a", SMALL, r=2, alpha=4)
    before = snapshot(tmp_path)
    with pytest.raises(am.ParameterError, match=r"adapter_config\.json is inside input .*/a; choose another output path"):
        check_file_output(a / "adapter_config.json", force=True, inputs=[a], create_parent=False)
    p = tmp_path / "p"
    (p / "unet").mkdir(parents=True)
    (p / "text_encoder").mkdir()
    os.replace(a / "adapter_model.safetensors", p / "unet" / "real.safetensors")
    os.symlink(p / "unet" / "real.safetensors", a / "adapter_model.safetensors")
    after_move = snapshot(tmp_path)
    with pytest.raises(am.ParameterError, match=r"output .*/p contains input .*/a; replacing it would delete the input"):
        check_pipeline_target(p, force=True, inputs=[a])
    assert snapshot(tmp_path) == after_move and len(before) > 0


def test_gguf_output_that_appears_meanwhile_is_not_replaced(tmp_path, monkeypatch):
    """The GGUF writer's final rename is the engine's no-replace rename: a file created at the output while the
    GGUF was written survives, the call fails naming it, and no temporary is left."""
    import adaptermerge.formats as F

    src = write_adapter(tmp_path / "p", r=4, alpha=8.0)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"num_attention_heads": 4, "num_key_value_heads": 2}))
    out = tmp_path / "o" / "a.gguf"
    real_place = am_adapter._place

    def race(s, dst, **kw):
        dst.write_bytes(b"the other run's output")
        return real_place(s, dst, **kw)

    monkeypatch.setattr(am_adapter, "_place", race)
    with pytest.raises(am.OutputError, match=r"a\.gguf appeared while this merge ran \(another merge\?\); not replacing it"):
        F.save(F.load(src), out, to="gguf", base=tmp_path / "hf")
    assert out.read_bytes() == b"the other run's output"
    assert temps(tmp_path) == []


def test_pipeline_folder_that_appears_meanwhile_is_not_replaced(tmp_path, monkeypatch, capsys):
    """A pipeline LoRA written as a folder of PEFT adapters: without --force, a folder created at the output while
    it was written is kept (exit 5) and nothing of the run is left behind."""
    from test_formats import kohya_file

    f = tmp_path / "k.safetensors"
    kohya_file(f)
    out = tmp_path / "p"
    real_place = am_adapter._place

    def race(s, dst, **kw):
        if dst == out:  # (the component folders inside the temporary are placed first)
            dst.mkdir()
            (dst / "notes.txt").write_text("someone else's")
        return real_place(s, dst, **kw)

    monkeypatch.setattr(am_adapter, "_place", race)
    code, _, err = cli(capsys, "convert", f, "--to", "peft", "-o", out)
    assert code == 5, err
    assert one_line(err) == f"error: {out} appeared while this merge ran (another merge?); not replacing it: pass --force to replace it"
    assert sorted(x.name for x in out.iterdir()) == ["notes.txt"]
    assert temps(tmp_path) == []


@pytest.mark.parametrize("kwargs", [
    {"params": {"density": "x" * 100_000}},
    {"params": {"majority_sign": "y" * 100_000}},
    {"weights": ["z" * 100_000]},
    {"params": {"q" * 100_000: 1.0}},
])
def test_operator_parameter_errors_shorten_each_echoed_value(kwargs):
    """A huge bad value is echoed cut to a few dozen characters, not only capped as a whole line."""
    from adaptermerge.engine import MergeRequest
    from adaptermerge.errors import ParameterError

    with pytest.raises(ParameterError) as e:
        MergeRequest.build("ties", 1, kwargs.get("weights"), kwargs.get("params", {}))
    assert len(str(e.value)) < 400, len(str(e.value))
