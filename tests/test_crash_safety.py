"""Crash safety (issue 4): SIGKILL a merge at random moments and at every file-system step of the commit.

A driver process imports adaptermerge once and forks one child per merge, so a kill costs no interpreter start.
After every kill the output path must be absent or hold a complete adapter byte-identical to an uninterrupted run
(with ``--force``: the old output or the new one); temporaries left by the killed child must carry its pid, and a
later run must remove them. Inputs are hashed before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from adaptermerge.adapter import _rename_exchange
from adaptermerge.safetensors_io import TEMP_PREFIX
from conftest import read_deltas, write_adapter

ROOT = Path(__file__).resolve().parents[1]
TEMP_RE = re.compile(r"^\.adaptermerge-tmp-(?P<pid>[0-9]+)-[0-9a-f]{8}-")

DRIVER = r"""
import importlib, json, os, signal, sys, time, traceback
import adaptermerge as am


def hook(target, n, when):
    '''SIGKILL this process just before / just after the n-th call (0-based) of module.function ``target``.'''
    mod_name, fn_name = target.rsplit(".", 1)
    mod = importlib.import_module(mod_name)
    real = getattr(mod, fn_name)
    calls = [0]

    def wrapped(*args, **kwargs):
        i = calls[0]
        calls[0] += 1
        if i == n and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        if i == n and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(mod, fn_name, wrapped)


print("ready", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            for h in cmd.get("hooks", []):
                hook(*h)
            am.merge_to(cmd["out"], cmd["inputs"], cmd["method"], force=cmd["force"], **cmd["params"])
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    if cmd.get("delay") is not None:
        time.sleep(cmd["delay"])  # the random moment of the kill
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"pid": pid, "killed": os.WIFSIGNALED(status),
                      "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                      "seconds": time.monotonic() - t0}), flush=True)
"""


class Driver:
    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd, default=str) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "driver died"
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def driver():
    d = Driver()
    yield d
    d.close()


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def state(out: Path) -> dict[str, str] | None:
    """The output's content (file name -> sha256), None when it does not exist."""
    if not os.path.lexists(out):
        return None
    if out.is_file():
        return {"<file>": sha(out)}
    return {p.name: sha(p) for p in sorted(out.iterdir())}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX))


def inputs_hash(paths: list[Path]) -> dict[str, str]:
    return {str(f): sha(f) for p in paths for f in sorted(p.rglob("*")) if f.is_file()}


def check_after_kill(res: dict, out: Path, allowed: list, seen_pids: set[int]) -> None:
    st = state(out)
    assert st in allowed, f"after a kill at {res}: output is {st}"
    for name in leftovers(out.parent):
        m = TEMP_RE.match(name)
        assert m, f"temporary without owner pid: {name}"
        assert int(m["pid"]) in seen_pids, f"{name} belongs to no child of this test"


def prepare(tmp_path: Path, modules: dict, n_inputs: int) -> list[Path]:
    return [write_adapter(tmp_path / f"in{i}", modules, r=8, seed=i) for i in range(n_inputs)]


BIG = {f"model.layers.{i}.self_attn.{p}": (1024, 1024) for i in range(8) for p in ("q_proj", "v_proj")}
SMALL = {f"model.layers.{i}.mlp.up_proj": (32, 24) for i in range(3)}


def test_sigkill_at_random_moments(tmp_path, driver):
    inputs = prepare(tmp_path, BIG, 3)
    before = inputs_hash(inputs)
    work = tmp_path / "work"
    work.mkdir()
    params = {"density": 0.5, "rank": 8, "seed": 3}
    r = driver.run(out=tmp_path / "ref_o", inputs=inputs, method="ties", force=False, params=params)
    assert r["exit"] == 0
    t = r["seconds"]
    # a .safetensors output holds exactly the weights file of a folder output
    ref = {"dir": state(tmp_path / "ref_o"), "file": {"<file>": sha(tmp_path / "ref_o" / "adapter_model.safetensors")}}
    old = {}
    for kind in ("dir", "file"):
        name = "old_o" if kind == "dir" else "old_o.safetensors"
        driver.run(out=tmp_path / name, inputs=inputs[:1], method="linear", force=False, params={})
        old[kind] = state(tmp_path / name)
    got = read_deltas(tmp_path / "ref_o")  # the reference itself is a valid PEFT adapter
    assert len(got) == len(BIG) and all(torch.isfinite(d).all() for d in got.values())
    rng = random.Random(20240601)
    kills = 12
    seen: set[int] = set()
    outcomes = []
    swap_atomic = _rename_exchange_works(tmp_path)
    for i in range(kills):
        kind = ("dir", "file")[i % 2]
        force = (i // 2) % 2 == 1
        out = work / ("out" if kind == "dir" else "out.safetensors")
        if os.path.lexists(out):
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        if force:
            src = tmp_path / ("old_o" if kind == "dir" else "old_o.safetensors")
            shutil.copytree(src, out) if kind == "dir" else shutil.copy(src, out)
        delay = t * (i + rng.random()) / kills * 1.1  # spread over the whole run, a few past its end
        res = driver.run(out=out, inputs=inputs, method="ties", force=force, params=params, delay=delay)
        seen.add(res["pid"])
        outcomes.append(res["killed"])
        allowed = [ref[kind]] + ([old[kind]] if force else [None])
        if force and kind == "dir" and not swap_atomic:
            allowed.append(None)
        check_after_kill(res, out, allowed, seen)
    assert sum(outcomes) >= kills // 2, "most runs must really be killed mid-way"
    # the next complete run removes every temporary of the killed children and writes the reference bytes
    res = driver.run(out=work / "final", inputs=inputs, method="ties", force=False, params=params)
    assert res["exit"] == 0
    assert leftovers(work) == []
    assert state(work / "final") == ref["dir"]
    assert inputs_hash(inputs) == before


def _rename_exchange_works(tmp: Path) -> bool:
    a, b = tmp / "xa", tmp / "xb"
    a.mkdir()
    b.mkdir()
    try:
        return _rename_exchange(a, b)
    finally:
        a.rmdir()
        b.rmdir()


HOOKS = ["os.fsync", "os.replace", "adaptermerge.adapter._rename_exchange", "adaptermerge.adapter._rename_noreplace",
         "shutil.rmtree", "os.rmdir"]


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_sigkill_at_every_commit_step(tmp_path, driver, kind):
    """Kill just before and just after every fsync / rename / swap / removal the commit makes, with and without
    an existing output (--force): each of those moments must leave the old output or the new one, complete."""
    inputs = prepare(tmp_path, SMALL, 2)
    before = inputs_hash(inputs)
    name = "o" if kind == "dir" else "o.safetensors"
    driver.run(out=tmp_path / f"ref_{name}", inputs=inputs, method="linear", force=False, params={"rank": 4})
    driver.run(out=tmp_path / f"old_{name}", inputs=inputs[:1], method="linear", force=False, params={})
    ref, old = state(tmp_path / f"ref_{name}"), state(tmp_path / f"old_{name}")
    assert ref is not None and old is not None and ref != old
    work = tmp_path / "work"
    work.mkdir()
    out = work / name
    seen: set[int] = set()
    killed_points = 0
    swap_atomic = _rename_exchange_works(tmp_path)
    for force in (False, True):
        for target in HOOKS:
            for when in ("before", "after"):
                for n in range(8):  # until the n-th call no longer happens
                    if os.path.lexists(out):
                        shutil.rmtree(out) if out.is_dir() else out.unlink()
                    if force:
                        src = tmp_path / f"old_{name}"
                        shutil.copytree(src, out) if kind == "dir" else shutil.copy(src, out)
                    res = driver.run(out=out, inputs=inputs, method="linear", force=force, params={"rank": 4},
                                     hooks=[[target, n, when]])
                    seen.add(res["pid"])
                    allowed = [ref] + ([old] if force else [None])
                    if force and kind == "dir" and not swap_atomic:
                        allowed.append(None)
                    check_after_kill(res, out, allowed, seen)
                    if not res["killed"]:
                        assert res["exit"] == 0 and state(out) == ref
                        break
                    killed_points += 1
    assert killed_points >= (10 if kind == "file" else 16)
    res = driver.run(out=work / "final", inputs=inputs, method="linear", force=False, params={"rank": 4})
    assert res["exit"] == 0 and leftovers(work) == []
    assert inputs_hash(inputs) == before


def test_output_is_a_valid_adapter_after_completion(tmp_path, driver):
    """The bytes the crash tests compare against are a real, loadable adapter equal to the exact linear merge."""
    inputs = prepare(tmp_path, SMALL, 2)
    res = driver.run(out=tmp_path / "o", inputs=inputs, method="linear", force=False, params={"rank": 16})
    assert res["exit"] == 0
    with safe_open(str(tmp_path / "o" / "adapter_model.safetensors"), "pt") as f:
        assert len(list(f.keys())) == 2 * len(SMALL)
    got, da, db = read_deltas(tmp_path / "o"), read_deltas(inputs[0]), read_deltas(inputs[1])
    for k in da:
        want = 0.5 * (da[k] + db[k])
        assert float((got[k] - want).norm() / want.norm()) < 1e-5
