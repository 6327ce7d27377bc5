"""What a new user meets first: readable listings, messages in the caller's language, refusals with reasons,
ordinary file modes, a model card, and hub ids answered with how to get the adapter.

Expected values are written out here (orders, modes, deltas from the input files read with safetensors), never
taken from the code under test."""

from __future__ import annotations

import io
import os
import re
import stat
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors import safe_open

import adaptermerge as am
from adaptermerge.cli import main, render_methods
from adaptermerge.registry import describe
from conftest import read_deltas, write_adapter

LAYERS = (0, 1, 2, 3, 10, 11, 22)
DEEP = {f"model.layers.{i}.self_attn.{p}": (8, 8) for i in LAYERS for p in ("q_proj", "v_proj")}


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------------------ inspect order
def test_inspect_sorts_layers_naturally(tmp_path, capsys):
    a = write_adapter(tmp_path / "a", DEEP, r=2)
    code, out, _ = cli(capsys, "inspect", a)
    assert code == 0
    rows = re.findall(r"model\.layers\.(\d+)\.self_attn\.([qv])_proj", out)
    want = [(str(i), p) for i in LAYERS for p in ("q", "v")]  # 0, 1, 2, 3, 10, 11, 22: not 0, 1, 10, 11, 2, 22, 3
    assert rows == want


def test_natural_key_orders_numbers_by_value():
    from adaptermerge.analyze_cli import natural_key

    names = ["layers.10.q", "layers.2.q", "layers.1.q", "layers.2.k", "layers.100.q", "embed"]
    assert sorted(names, key=natural_key) == ["embed", "layers.1.q", "layers.2.k", "layers.2.q", "layers.10.q", "layers.100.q"]


# ------------------------------------------------------------------------------------------------ widths
def test_methods_fit_100_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    code, out, _ = cli(capsys, "methods")
    assert code == 0
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    assert "…" not in out
    info = describe()
    for m in info:
        assert re.search(rf"│ {re.escape(m['name'])}\s", out), m["name"]
        for paper in m["papers"]:
            assert paper["url"].startswith("http") and paper["url"] in out, paper["url"]  # links are never cut
            assert paper["repo"] is None or f"github.com/{paper['repo']}" in out
        for p in m["params"]:
            assert f"{p['name']}=" in out


@pytest.mark.parametrize("width", [100, 80])
def test_methods_table_fits_a_fixed_width_console(width):
    buf = io.StringIO()
    render_methods(describe(), Console(file=buf, width=width, force_terminal=False, color_system=None))
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= width
    assert "…" not in text and "https://arxiv.org/abs/2306.01708" in text


def test_analyze_keeps_module_names_whole_at_120_columns(tmp_path):
    from adaptermerge.analyze_cli import render
    from adaptermerge.diagnostics import analyze

    mods = {f"model.layers.{i}.self_attn.{p}": (64, 64) for i in (1, 10, 22) for p in ("q_proj", "v_proj")}
    mods.update({f"model.layers.{i}.mlp.up_proj": (1536, 64) for i in (1, 10)})
    paths = [write_adapter(tmp_path / n, mods, r=2, seed=s) for s, n in enumerate("abc")]
    result = analyze(paths, samples=256)
    buf = io.StringIO()
    render(result, Console(file=buf, width=120, force_terminal=False, color_system=None), top=0, sort="name")
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 120
    table = text.split("modules (by name")[1]
    assert all(line.rstrip()[-1] in "┓┃┩│┘" for line in table.splitlines()[1:] if line.strip())  # not cropped
    shown = re.findall(r"^│ (\S+)\s", table, flags=re.M)
    want = [n.removeprefix("model.") for n in sorted(mods, key=lambda n: (int(n.split(".")[2]), n))]
    assert shown == want  # every name whole (q_proj and v_proj apart), layers in numeric order


def test_analyze_command_honours_columns(tmp_path, capsys, monkeypatch):
    mods = {f"model.layers.{i}.self_attn.{p}": (64, 64) for i in (2, 10) for p in ("q_proj", "v_proj")}
    paths = [write_adapter(tmp_path / n, mods, r=2, seed=s) for s, n in enumerate("abc")]
    monkeypatch.setenv("COLUMNS", "120")
    code, out, _ = cli(capsys, "analyze", *paths, "--sort", "name", "--top", "0", "--samples", "256")
    assert code == 0
    assert max(len(line) for line in out.splitlines() if line[:1] in "┏┃┡│└") <= 120  # tables fit; prose soft-wraps
    table = out.split("modules (by name")[1]
    assert all(line.rstrip()[-1] in "┓┃┩│┘" for line in table.splitlines()[1:] if line.strip())  # not cropped
    assert re.findall(r"^│ (\S+)\s", table, flags=re.M) == [
        "layers.2.self_attn.q_proj", "layers.2.self_attn.v_proj", "layers.10.self_attn.q_proj", "layers.10.self_attn.v_proj"]


# ------------------------------------------------------------------------------------------------ wording
def test_cli_speaks_flags_and_api_speaks_keywords(tmp_path, capsys):
    a = write_adapter(tmp_path / "a", r=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    code, _, err = cli(capsys, "merge", a, "-o", out)
    line = error_line(err)
    assert code == 5 and line.endswith("already exists; pass --force to replace it") and "force=True" not in line
    with pytest.raises(am.OutputError) as info:
        am.merge_to(out, [a])
    assert str(info.value).endswith("already exists; pass force=True to replace it") and "--force" not in str(info.value)

    bare = write_adapter(tmp_path / "bare.safetensors", r=2, bare=True)
    code, _, err = cli(capsys, "merge", bare, "-o", tmp_path / "o2")
    line = error_line(err)
    assert code == 2 and line.endswith("pass --alpha") and "alpha=" not in line
    with pytest.raises(am.ParameterError) as info:
        am.load_adapter(bare)
    assert str(info.value).endswith("pass alpha=... to load_adapter") and "--alpha" not in str(info.value)

    code, _, err = cli(capsys, "merge", a, a, "--weights", "1,-1", "-o", tmp_path / "o3")
    line = error_line(err)
    assert code == 2 and "pass --no-normalize" in line and "normalize=" not in line
    with pytest.raises(am.ParameterError, match=r"pass normalize=False, or use task_arithmetic"):
        am.merge([a, a], weights=[1, -1])


# ------------------------------------------------------------------------------------------------ disjoint inputs
def test_merge_refuses_adapters_with_no_module_in_common(tmp_path, capsys):
    a = write_adapter(tmp_path / "a", {"model.layers.0.self_attn.q_proj": (8, 8)}, r=2, seed=1)
    b = write_adapter(tmp_path / "b", {"model.layers.0.mlp.up_proj": (16, 8)}, r=2, seed=2)
    code, _, err = cli(capsys, "merge", a, b, "-o", tmp_path / "m")
    line = error_line(err)
    assert code == 4
    assert "no module in common" in line and "pass --allow-disjoint" in line and "weight share" in line
    assert not (tmp_path / "m").exists()
    with pytest.raises(am.IncompatibleInputsError, match=r"no module in common.*pass allow_disjoint=True"):
        am.merge([a, b])
    # analyze refuses the same pair
    code, _, err = cli(capsys, "analyze", a, b)
    assert code == 4 and "no module in common" in error_line(err)

    # explicitly allowed: each module is its own input's delta times its weight share (linear, normalized)
    code, _, err = cli(capsys, "merge", a, b, "--allow-disjoint", "--weights", "3,1", "-o", tmp_path / "m", "-q")
    assert code == 0, err
    got = read_deltas(tmp_path / "m")
    da, db = read_deltas(a), read_deltas(b)
    torch.testing.assert_close(got["model.layers.0.self_attn.q_proj"], 0.75 * da["model.layers.0.self_attn.q_proj"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["model.layers.0.mlp.up_proj"], 0.25 * db["model.layers.0.mlp.up_proj"], rtol=1e-5, atol=1e-6)


def test_merge_refuses_an_input_that_shares_nothing_with_the_others(tmp_path):
    shared = {"model.layers.0.self_attn.q_proj": (8, 8)}
    a = write_adapter(tmp_path / "a", shared, r=2, seed=1)
    b = write_adapter(tmp_path / "b", shared, r=2, seed=2)
    c = write_adapter(tmp_path / "c", {"model.layers.5.mlp.up_proj": (16, 8)}, r=2, seed=3)
    with pytest.raises(am.IncompatibleInputsError, match=rf"^{re.escape(str(c))} shares no module with the other inputs"):
        am.merge([a, b, c], "ties", density=0.5)
    merged = am.merge([a, b, c], "ties", density=0.5, allow_disjoint=True)
    assert len(merged.modules) == 2
    # partial overlap (a module missing from one input) stays allowed, as before
    d = write_adapter(tmp_path / "d", {**shared, "model.layers.5.mlp.up_proj": (16, 8)}, r=2, seed=4)
    assert len(am.merge([a, d]).modules) == 2


# ------------------------------------------------------------------------------------------------ hub ids
def test_hub_id_gets_a_clear_message(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    a = write_adapter(tmp_path / "a", r=2)
    code, _, err = cli(capsys, "merge", a, "someorg/some-lora", "-o", tmp_path / "m")
    line = error_line(err)
    assert code == 3
    assert line.startswith("error: someorg/some-lora: no such file or directory. Inputs are local")
    assert "never downloads" in line and "huggingface-cli download someorg/some-lora --local-dir some-lora" in line
    assert str(tmp_path / "hf" / "hub") in line


def test_hub_id_found_in_the_local_hugging_face_cache(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    repo = tmp_path / "hf" / "hub" / "models--someorg--some-lora"
    rev = "0123456789abcdef0123456789abcdef01234567"
    write_adapter(repo / "snapshots" / "ffff000000000000000000000000000000000000", r=2, seed=9)  # an older revision
    snap = write_adapter(repo / "snapshots" / rev, r=2, seed=3)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    ad = am.load_adapter("someorg/some-lora")
    assert Path(ad.name) == snap and any("Hugging Face cache" in n and rev[:12] in n for n in ad.notes)
    a = write_adapter(tmp_path / "a", r=2, seed=1)
    code, _, err = cli(capsys, "merge", a, "someorg/some-lora", "-o", tmp_path / "m", "--rank", "4")
    assert code == 0, err
    assert "Hugging Face cache" in err
    got, da, ds = read_deltas(tmp_path / "m"), read_deltas(a), read_deltas(snap)
    for k in got:
        torch.testing.assert_close(got[k], (da[k] + ds[k]) / 2, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ file modes
@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_outputs_follow_the_umask(tmp_path, umask, mask):
    a = write_adapter(tmp_path / "a", r=2)
    b = write_adapter(tmp_path / "b", r=2, seed=1)
    umask(mask)
    folder = tmp_path / "merged"
    am.merge_to(folder, [a, b], "ties", density=0.5)
    single = tmp_path / "merged.safetensors"
    am.merge_to(single, [a, b])
    saved = am.merge([a, b]).save(tmp_path / "saved")
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    for d in (folder, saved):
        assert mode(d) == 0o777 & ~mask
        for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
            assert mode(d / name) == 0o666 & ~mask, name
    assert mode(single) == 0o666 & ~mask


# ------------------------------------------------------------------------------------------------ model card
def test_folder_output_gets_a_model_card(tmp_path):
    a = write_adapter(tmp_path / "alpha", r=2, seed=1)
    b = write_adapter(tmp_path / "beta", r=4, seed=2)
    folder = tmp_path / "merged"
    summary = am.merge_to(folder, [a, b], "ties", [0.7, 0.3], density=0.4, rank=3, seed=5)
    card = (folder / "README.md").read_text()
    assert "**ties**" in card and "density = 0.4" in card and "Output rank: 3" in card
    for path, w in ((a, "0.7"), (b, "0.3")):
        assert f"| `{path.name}` | {w} | `{am.load_adapter(path).sha256()}` |" in card
    worst = max(summary["modules"], key=lambda k: summary["modules"][k]["rel_error"])
    assert f"largest error: {summary['modules'][worst]['rel_error']:.3g}, in `{worst.removeprefix('base_model.model.')}`" in card
    assert f"{len(summary['modules'])} modules" in card
    assert "--method ties --weights 0.7,0.3 --density 0.4" in card and "--rank 3 --seed 5" in card
    # the card is only a folder's companion: the weights are the same bytes as a single-file output's
    single = tmp_path / "merged.safetensors"
    am.merge_to(single, [a, b], "ties", [0.7, 0.3], density=0.4, rank=3, seed=5)
    assert (folder / "adapter_model.safetensors").read_bytes() == single.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("merged")) == ["merged", "merged.safetensors"]
    with safe_open(str(single), "pt") as f:
        assert "README" not in str(f.metadata())
    # the same merge gives the same card, byte for byte
    am.merge_to(tmp_path / "again", [a, b], "ties", [0.7, 0.3], density=0.4, rank=3, seed=5)
    assert (tmp_path / "again" / "README.md").read_bytes() == card.encode()


def test_exact_merge_card_says_every_module_is_exact(tmp_path):
    a = write_adapter(tmp_path / "a", r=2, seed=1)
    b = write_adapter(tmp_path / "b", r=2, seed=2)
    am.merge_to(tmp_path / "m", [a, b], "linear", rank=4)
    card = (tmp_path / "m" / "README.md").read_text()
    assert "Every module is exact" in card and "largest error" not in card


# ------------------------------------------------------------------------------------------------ help text
def test_merge_help_has_no_line_break_inside_a_sentence(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setenv("TERMINAL_WIDTH", "100")
    code, out, _ = cli(capsys, "merge", "--help")
    assert code == 0
    text = out.split("Arguments")[0]
    paragraphs = [[ln.strip() for ln in block.splitlines() if ln.strip()] for block in re.split(r"\n\s*\n", text)]
    for para in paragraphs:
        for line, nxt in zip(para, para[1:]):
            # a line is only broken where the next word would not fit
            assert len(line) + 1 + len(nxt.split()[0]) > 96, (line, nxt)
    assert any("and are truncated back to low rank" in " ".join(p) for p in paragraphs)
