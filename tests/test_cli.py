"""The command line: every command runs; bad input exits non-zero with one line on stderr and writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adaptermerge.cli import main
from conftest import read_deltas, write_adapter


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_merge_ties_end_to_end(tmp_path, capsys):
    a = write_adapter(tmp_path / "a", seed=1)
    b = write_adapter(tmp_path / "b", seed=2)
    c = write_adapter(tmp_path / "c.safetensors", seed=3, bare=True, metadata={"lora_alpha": "8"})
    out = tmp_path / "merged"
    code, stdout, _ = run(capsys, "merge", a, b, c, "--method", "ties", "--weights", "0.5,0.3,0.2", "--density", "0.5",
                          "--rank", "4", "-o", out, "--json")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["method"] == "ties" and summary["weights"] == [0.5, 0.3, 0.2]
    assert summary["params"]["density"] == [0.5, 0.5, 0.5]
    assert set(listing(out)) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert not [p for p in listing(tmp_path) if p.startswith(".adaptermerge-tmp")]
    got = read_deltas(out)
    assert len(got) == 5 and all(torch.linalg.matrix_rank(d) <= 4 for d in got.values())


def test_inspect_and_methods(tmp_path, capsys):
    a = write_adapter(tmp_path / "a", seed=1)
    out = tmp_path / "m"
    assert run(capsys, "merge", a, "-o", out, "-q")[0] == 0
    code, stdout, _ = run(capsys, "inspect", out, "--json")
    assert code == 0
    info = json.loads(stdout)
    assert info["n_modules"] == 5
    assert info["provenance"]["adaptermerge.method"] == "linear"
    want = read_deltas(a)
    for row in info["modules"]:
        key = row["module"].removeprefix("base_model.model.")
        assert row["delta_norm"] == pytest.approx(float(want[key].norm()), rel=1e-5)
    code, stdout, _ = run(capsys, "inspect", a)
    assert code == 0 and "q_proj" in stdout
    code, stdout, _ = run(capsys, "methods", "--json")
    names = {m["name"] for m in json.loads(stdout)}
    assert {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs", "della", "cat"} <= names
    code, stdout, _ = run(capsys, "methods")
    assert code == 0 and "ties" in stdout and "arxiv.org/abs/2306.01708" in stdout


def test_config_file(tmp_path, capsys):
    a = write_adapter(tmp_path / "a", seed=1)
    b = write_adapter(tmp_path / "b", seed=2)
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(
        "method: task_arithmetic\n"
        "inputs:\n  - path: a\n    weight: 1.0\n  - path: b\n    weight: -0.5\n"
        "params:\n  scale: 2.0\n"
        "rank: 8\noutput: out\n"
    )
    code, _, err = run(capsys, "merge", "--config", cfg, "-q")
    assert code == 0, err
    got, da, db = read_deltas(tmp_path / "out"), read_deltas(a), read_deltas(b)
    for k in da:
        want = 2.0 * (da[k] - 0.5 * db[k])
        assert float((got[k] - want).norm() / want.norm()) < 1e-6


def one_line_error(err: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err


@pytest.mark.parametrize("case,code", [
    ("missing", 3), ("truncated", 3), ("shape", 4), ("unknown_method", 2), ("density", 2), ("exists", 5),
    ("weights_count", 2), ("no_alpha", 2), ("seed_text", 2),
])
def test_bad_input_exits_with_one_line(tmp_path, capsys, case, code):
    a = write_adapter(tmp_path / "a", seed=1)
    args = [a]
    extra: list[str] = []
    out = tmp_path / "out"
    if case == "missing":
        args.append(tmp_path / "nope")
    elif case == "truncated":
        f = tmp_path / "t.safetensors"
        data = (a / "adapter_model.safetensors").read_bytes()
        f.write_bytes(data[: len(data) // 2])
        args.append(f)
        extra = ["--alpha", "8"]
    elif case == "shape":
        args.append(write_adapter(tmp_path / "b", {"model.layers.0.self_attn.q_proj": (32, 16)}, seed=2))
    elif case == "unknown_method":
        extra = ["--method", "tie"]
    elif case == "density":
        extra = ["--method", "ties", "--density", "1.5"]
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "weights_count":
        extra = ["--weights", "0.5,0.5"]
    elif case == "no_alpha":
        args.append(write_adapter(tmp_path / "bare.safetensors", seed=2, bare=True))
    elif case == "seed_text":
        extra = ["--seed", "abc"]
    before = listing(tmp_path)
    got_code, _, err = run(capsys, "merge", *args, *extra, "-o", out)
    assert got_code == code, err
    one_line_error(err)
    if case == "unknown_method":
        assert "did you mean 'ties'" in err
    if case == "shape":
        assert "q_proj" in err and str(tmp_path / "b") in err
    if case == "exists":
        assert listing(out) == ["keep.txt"]
    else:
        assert not out.exists()
    assert listing(tmp_path) == before  # no temporary files left behind


def test_output_inside_input_refused(tmp_path, capsys):
    a = write_adapter(tmp_path / "a", seed=1)
    code, _, err = run(capsys, "merge", a, "-o", a / "sub")
    assert code == 2 and "inside input" in err
    one_line_error(err)


def test_force_replaces_atomically(tmp_path, capsys):
    a = write_adapter(tmp_path / "a", seed=1)
    b = write_adapter(tmp_path / "b", seed=2)
    out = tmp_path / "out"
    assert run(capsys, "merge", a, "-o", out, "-q")[0] == 0
    assert run(capsys, "merge", b, "-o", out, "-q", "--force")[0] == 0
    got, db = read_deltas(out), read_deltas(b)
    for k in db:
        assert float((got[k] - db[k]).norm() / db[k].norm()) < 1e-6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]


def test_console_script_subprocess(tmp_path):
    """The installed entry point: a real process, real exit code, one stderr line."""
    a = write_adapter(tmp_path / "a", seed=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    exe = Path(sys.executable).with_name("adaptermerge")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "adaptermerge"]
    ok = subprocess.run([*cmd, "merge", str(a), "-o", str(tmp_path / "o"), "-q"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([*cmd, "merge", str(a), "--method", "ties", "--density", "0", "-o", str(tmp_path / "p")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    one_line_error(bad.stderr)
    assert "density" in bad.stderr and not (tmp_path / "p").exists()


def test_generic_param_option_and_the_loss_warning(tmp_path, capsys):
    """-p NAME=VALUE reaches the operator (same bytes as the Python call); a bad name or a value given twice is a
    one-line error; a truncation losing more than 10% prints the warning with its ways out."""
    import hashlib

    import adaptermerge as am

    a = write_adapter(tmp_path / "a", seed=1)
    b = write_adapter(tmp_path / "b", seed=2, r=6)
    out = tmp_path / "cli"
    code, _, err = run(capsys, "merge", a, b, "-m", "knots", "-p", "density=0.5,0.4", "-p", "topk=model", "-p",
                       "normalize=false", "-o", out, "-q")
    assert code == 0 and "warning" not in err
    am.merge_to(tmp_path / "api", [a, b], "knots", density=[0.5, 0.4], topk="model", normalize=False)
    sha = [hashlib.sha256((d / "adapter_model.safetensors").read_bytes()).hexdigest() for d in (out, tmp_path / "api")]
    assert sha[0] == sha[1]
    code, _, err = run(capsys, "merge", a, b, "-m", "ties", "-p", "densty=0.5", "-o", tmp_path / "x")
    assert code == 2 and err.count("\n") == 1 and "did you mean 'density'" in err and not (tmp_path / "x").exists()
    code, _, err = run(capsys, "merge", a, b, "-m", "ties", "-p", "density=0.5", "--density", "0.3", "-o", tmp_path / "x")
    assert code == 2 and "given twice" in err
    code, _, err = run(capsys, "merge", a, b, "-m", "ties", "--density", "0.5", "-o", tmp_path / "t", "-q")
    assert code == 0 and err.startswith("warning: truncating to rank 6 lost more than 10%")
    assert "-p space=core" in err and "--rank full" in err and "--method cat" in err
    code, _, err = run(capsys, "merge", a, b, "-m", "ties", "--density", "0.5", "-p", "space=core", "-o", tmp_path / "c",
                       "-q", "--json")
    assert code == 0 and "warning" not in err


def test_methods_lists_every_operator_with_its_paper(capsys):
    code, stdout, _ = run(capsys, "methods", "--json")
    info = {m["name"]: m for m in json.loads(stdout)}
    assert code == 0 and {"tsv_m", "iso_c", "iso_cts", "knots", "ties"} <= set(info)
    assert info["knots"]["papers"][0]["arxiv"] == "2410.19735" and info["knots"]["form"] == "factors"
    assert info["iso_cts"]["papers"][0]["repo"] == "danielm1405/iso-merging"
    assert any(p["name"] == "space" and p["choices"] == ["full", "core"] for p in info["ties"]["params"])
    code, stdout, _ = run(capsys, "methods")
    assert code == 0 and "2412.00081" in stdout and "tsv_m" in stdout
