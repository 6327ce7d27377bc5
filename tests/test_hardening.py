"""Hostile and broken inputs, bad parameters and output failures (issue 4).

Every case runs through the command line *and* the Python API and must give: the project's own error type, a
one-line message naming the file / tensor / parameter at fault, the documented exit code, nothing written and
the inputs untouched (every file under the test folder is hashed before and after).
docs/reliability.md lists each case with the test that covers it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import pickle
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import adaptermerge as am
from adaptermerge.adapter import Adapter
from adaptermerge.cli import main
from conftest import read_deltas, write_adapter

PKG = Path(am.__file__).parent
ROOT = PKG.parent
CODES = {am.ParameterError: 2, am.InputError: 3, am.IncompatibleInputsError: 4, am.OutputError: 5}
Q = "model.layers.0.self_attn.q_proj"
SMALL = {Q: (8, 6), "model.layers.0.self_attn.v_proj": (4, 6)}
KA = f"base_model.model.{Q}.lora_A.weight"
KB = f"base_model.model.{Q}.lora_B.weight"


# ------------------------------------------------------------------------------------------------ helpers
def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 (or '<dir>') of everything under root, hidden files included."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            out[rel] = "<special>"
        elif p.is_dir():
            out[rel] = "<dir>"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_line(msg: str) -> str:
    lines = [ln for ln in msg.splitlines() if ln.strip()]
    assert len(lines) == 1, msg
    return lines[0]


def raw_safetensors(header: dict, data: bytes, *, n: int | None = None) -> bytes:
    """Hand-made safetensors bytes: header JSON as given (no validation), optional forged header length."""
    h = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(h) if n is None else n) + h + data


def valid_parts(seed: int = 0) -> tuple[dict, bytes]:
    """Header dict and data bytes of a valid one-module adapter (A 2x6, B 8x2, float32)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, 6, generator=g), torch.randn(8, 2, generator=g)
    da, db = a.numpy().tobytes(), b.numpy().tobytes()
    header = {
        "__metadata__": {"format": "pt"},
        KA: {"dtype": "F32", "shape": [2, 6], "data_offsets": [0, len(da)]},
        KB: {"dtype": "F32", "shape": [8, 2], "data_offsets": [len(da), len(da) + len(db)]},
    }
    return header, da + db


def adapter_dir(path: Path, weights: bytes | None = None, config: Any = None) -> Path:
    """A PEFT directory with the given weights bytes (default: valid) and config (default: valid, r=2)."""
    path.mkdir(parents=True, exist_ok=True)
    if weights is None:
        weights = raw_safetensors(*valid_parts())
    (path / "adapter_model.safetensors").write_bytes(weights)
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]} if config is None else config
    (path / "adapter_config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return path


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


# ------------------------------------------------------------------------------------------------ the case table
@dataclass
class Case:
    inputs: list[Path]
    code: int
    pattern: str  # regex the one-line message must match (names the file / tensor / parameter)
    cli: list[str] = field(default_factory=list)
    api: dict[str, Any] = field(default_factory=dict)
    method: str = "linear"


def _corrupt(tmp: Path, mutate: Callable[[dict, bytes], bytes], pattern: str, code: int = 3) -> Case:
    header, data = valid_parts()
    d = adapter_dir(tmp / "bad", mutate(header, data))
    pattern = pattern.replace("FILE", _re(d / "adapter_model.safetensors")).replace("DIR", _re(d))
    return Case([tmp / "good", d], code, pattern)


def _re(p: Path) -> str:
    return re.escape(str(p))


def _set(name: str, key: str, value: Any) -> Callable[[dict, bytes], bytes]:
    def mutate(header: dict, data: bytes) -> bytes:
        header[name][key] = value
        return raw_safetensors(header, data)

    return mutate


def _truncate_at(where: str) -> Callable[[dict, bytes], bytes]:
    def mutate(header: dict, data: bytes) -> bytes:
        full = raw_safetensors(header, data)
        header_end = 8 + struct.unpack("<Q", full[:8])[0]
        cut = {"1": 1, "7": 7, "8": 8, "in_header": header_end // 2, "header_end": header_end,
               "in_data": header_end + len(data) // 2, "last_byte": len(full) - 1}[where]
        return full[:cut]

    return mutate


def _huge_tensor(header: dict, data: bytes) -> bytes:
    # 2**20 x 2**20 float64 = 8 TiB, offsets consistent with the shape, file of a few hundred bytes
    n = 8 * 2**40
    header[KA] = {"dtype": "F64", "shape": [2**20, 2**20], "data_offsets": [0, n]}
    header[KB]["data_offsets"] = [n, n + 64]
    return raw_safetensors(header, data)


def _nested(header: dict, data: bytes) -> bytes:
    h = b"[" * 200_000 + b"]" * 200_000
    return struct.pack("<Q", len(h)) + h + data


def _huge_int(header: dict, data: bytes) -> bytes:
    h = b'{"x":' + b"9" * 6000 + b"}"
    return struct.pack("<Q", len(h)) + h + data


def _overlap(header: dict, data: bytes) -> bytes:
    header[KB]["data_offsets"] = [40, 104]
    return raw_safetensors(header, data)


def _past_end(header: dict, data: bytes) -> bytes:
    header[KB]["data_offsets"] = [48, 48 + 64 + 8]
    header[KB]["shape"] = [9, 2]
    return raw_safetensors(header, data)


def _header_len(n: int) -> Callable[[dict, bytes], bytes]:
    return lambda header, data: raw_safetensors(header, data, n=n)


def _lone(drop: str) -> Callable[[dict, bytes], bytes]:
    def mutate(header: dict, data: bytes) -> bytes:
        del header[drop]
        return raw_safetensors(header, data)

    return mutate


def _rank_mismatch(header: dict, data: bytes) -> bytes:
    # A is 2x6 (rank 2), B becomes 4x4 (rank 4): same byte length, ranks disagree
    header[KB]["shape"] = [4, 4]
    return raw_safetensors(header, data)


def _nan_or_inf(value: float, key: str) -> Callable[[dict, bytes], bytes]:
    def mutate(header: dict, data: bytes) -> bytes:
        start = header[key]["data_offsets"][0] + 4 * 3
        return raw_safetensors(header, data[:start] + struct.pack("<f", value) + data[start + 4:])

    return mutate


def build_case(name: str, tmp: Path) -> Case:  # noqa: C901 - a flat table of cases
    adapter_dir(tmp / "good")
    good = tmp / "good"
    if name == "missing_file":
        return Case([good, tmp / "nope"], 3, _re(tmp / "nope") + ": no such file")
    if name == "missing_weights_file":
        return Case([good, tmp / "w.safetensors"], 3, _re(tmp / "w.safetensors") + ": no such file")
    if name == "dir_without_weights":
        (tmp / "empty").mkdir()
        return Case([good, tmp / "empty"], 3, _re(tmp / "empty") + ": no adapter_model.safetensors")
    if name == "dir_without_config":
        d = adapter_dir(tmp / "nocfg")
        (d / "adapter_config.json").unlink()
        return Case([good, d], 3, _re(d) + ": no adapter_config.json")
    if name == "weights_is_a_directory":
        d = tmp / "wdir"
        (d / "adapter_model.safetensors").mkdir(parents=True)
        (d / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 4}')
        return Case([good, d], 3, _re(d / "adapter_model.safetensors") + ": .*directory")
    if name == "weights_is_a_fifo":
        d = tmp / "fifo"
        d.mkdir()
        os.mkfifo(d / "adapter_model.safetensors")
        (d / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 4}')
        return Case([good, d], 3, _re(d / "adapter_model.safetensors") + ": not a regular file")
    if name == "empty_file":
        return _corrupt(tmp, lambda h, d: b"", "FILE: empty file")
    if name.startswith("truncated_"):
        return _corrupt(tmp, _truncate_at(name.removeprefix("truncated_")), "FILE: .*(truncated|past the end)")
    if name == "header_length_larger_than_file":
        return _corrupt(tmp, _header_len(10_000), "FILE: safetensors header claims 10000 bytes but the file has only")
    if name == "header_length_2_63":
        return _corrupt(tmp, _header_len(2**63), "FILE: safetensors header claims")
    if name == "header_not_json":
        return _corrupt(tmp, lambda h, d: struct.pack("<Q", 9) + b"{not json" + d, "FILE: .*not valid JSON")
    if name == "header_not_utf8":
        return _corrupt(tmp, lambda h, d: struct.pack("<Q", 4) + b"\xff\xfe{}" + d, "FILE: .*not valid JSON")
    if name == "header_is_a_list":
        return _corrupt(tmp, lambda h, d: raw_safetensors([1, 2], d), "FILE: .*not a JSON object")
    if name == "header_deeply_nested":
        return _corrupt(tmp, _nested, "FILE: .*header")
    if name == "header_huge_integer":
        return _corrupt(tmp, _huge_int, "FILE: .*header")
    if name == "metadata_not_strings":
        return _corrupt(tmp, lambda h, d: raw_safetensors({**h, "__metadata__": {"a": 1}}, d), "FILE: .*__metadata__")
    if name == "entry_not_an_object":
        return _corrupt(tmp, lambda h, d: raw_safetensors({**h, KA: [1]}, d), f"FILE: tensor '{re.escape(KA)}': .*not an object")
    if name == "unknown_dtype":
        return _corrupt(tmp, _set(KA, "dtype", "F128"), f"FILE: tensor '{re.escape(KA)}': unknown dtype 'F128'")
    if name == "dtype_not_a_string":
        return _corrupt(tmp, _set(KA, "dtype", ["F32"]), f"FILE: tensor '{re.escape(KA)}': unknown dtype")
    if name == "shape_not_a_list":
        return _corrupt(tmp, _set(KA, "shape", "2x6"), f"FILE: tensor '{re.escape(KA)}': invalid shape")
    if name == "shape_negative":
        return _corrupt(tmp, _set(KA, "shape", [-2, -6]), f"FILE: tensor '{re.escape(KA)}': invalid shape")
    if name == "shape_bytes_mismatch":
        return _corrupt(tmp, _set(KA, "shape", [2, 7]), f"FILE: tensor '{re.escape(KA)}': shape \\[2, 7\\] of F32 needs 56 bytes but data_offsets span 48")
    if name == "offsets_reversed":
        return _corrupt(tmp, _set(KA, "data_offsets", [48, 0]), f"FILE: tensor '{re.escape(KA)}': invalid data_offsets")
    if name == "offsets_not_ints":
        return _corrupt(tmp, _set(KA, "data_offsets", [0.0, 48.0]), f"FILE: tensor '{re.escape(KA)}': invalid data_offsets")
    if name == "offsets_overlap":
        return _corrupt(tmp, _overlap, "FILE: tensors '.*' and '.*' overlap")
    if name == "offsets_past_end":
        return _corrupt(tmp, _past_end, f"FILE: tensor '{re.escape(KB)}': data runs past the end")
    if name == "huge_tensor_claim":
        return _corrupt(tmp, _huge_tensor, f"FILE: tensor '{re.escape(KA)}': data runs past the end")
    if name == "pickle_dir":
        d = tmp / "pk"
        d.mkdir()
        (d / "adapter_model.bin").write_bytes(b"not really")
        (d / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 4}')
        return Case([good, d], 3, _re(d) + ": no adapter_model.safetensors .*pickle files are never unpickled; convert")
    if name in ("pickle_bin", "pickle_pt", "pickle_ckpt"):
        f = tmp / f"x.{name.removeprefix('pickle_')}"
        f.write_bytes(b"whatever")
        return Case([good, f], 3, _re(f) + ": pickle-based checkpoints are never unpickled .*convert",
                    cli=["--alpha", "4"], api={})
    if name == "config_not_json":
        d = adapter_dir(tmp / "c", config="{r: 2,")
        return Case([good, d], 3, _re(d / "adapter_config.json") + ": not valid JSON")
    if name == "config_not_an_object":
        d = adapter_dir(tmp / "c", config="[2, 4]")
        return Case([good, d], 3, _re(d / "adapter_config.json") + ": expected a JSON object")
    if name in ("config_r_zero", "config_r_negative"):
        d = adapter_dir(tmp / "c", config={"r": 0 if name.endswith("zero") else -2, "lora_alpha": 4})
        return Case([good, d], 3, _re(d) + ".*: r must be > 0")
    if name == "config_r_text":
        d = adapter_dir(tmp / "c", config={"r": "2", "lora_alpha": 4})
        return Case([good, d], 3, _re(d) + ".*: r must be a number")
    if name == "config_alpha_text":
        d = adapter_dir(tmp / "c", config={"r": 2, "lora_alpha": "four"})
        return Case([good, d], 3, _re(d) + ".*: lora_alpha must be a number, got 'four'")
    if name == "config_alpha_nan":
        d = adapter_dir(tmp / "c", config='{"r": 2, "lora_alpha": NaN}')
        return Case([good, d], 3, _re(d) + ".*: lora_alpha must be a number")
    if name == "config_r_disagrees_with_tensors":
        d = adapter_dir(tmp / "c", config={"r": 3, "lora_alpha": 4})
        return Case([good, d], 3, _re(d) + f".*module '{re.escape(KA.removesuffix('.lora_A.weight'))}' has rank 2 in its tensors but the config says r=3")
    if name == "config_rank_pattern_bad_regex":
        d = adapter_dir(tmp / "c", config={"r": 2, "lora_alpha": 4, "rank_pattern": {"q_proj(": 2}})
        return Case([good, d], 3, _re(d) + ".*rank_pattern.*'q_proj\\(' is not a valid regular expression")
    if name == "config_rank_pattern_zero":
        d = adapter_dir(tmp / "c", config={"r": 2, "lora_alpha": 4, "rank_pattern": {"q_proj": 0}})
        return Case([good, d], 3, _re(d) + ".*rank_pattern\\['q_proj'\\] = 0 is not a valid rank")
    if name == "config_peft_type":
        d = adapter_dir(tmp / "c", config={"peft_type": "IA3", "r": 2, "lora_alpha": 4})
        return Case([good, d], 3, _re(d / "adapter_config.json") + ": peft_type 'IA3' is not LORA")
    if name == "lora_A_without_B":
        return _corrupt(tmp, _lone(KB), "DIR: module '.*q_proj' has lora_A but no lora_B")
    if name == "lora_B_without_A":
        return _corrupt(tmp, _lone(KA), "DIR: module '.*q_proj' has lora_B but no lora_A")
    if name == "rank_A_B_disagree":
        return _corrupt(tmp, _rank_mismatch, "DIR: module '.*q_proj': lora_A has rank 2 but lora_B has rank 4")
    if name == "factor_not_2d":
        return _corrupt(tmp, _set(KA, "shape", [12]), f"DIR: tensor '{re.escape(KA)}' has shape \\[12\\], expected 2 dimensions")
    if name == "factor_integer_dtype":
        return _corrupt(tmp, _set(KA, "dtype", "I32"), f"DIR: tensor '{re.escape(KA)}' has dtype I32; LoRA factors must be floating point")
    if name == "no_lora_tensors":
        return _corrupt(tmp, lambda h, d: raw_safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, d[:8]), "DIR: no LoRA tensors found")
    if name in ("nan_in_A", "inf_in_B", "neg_inf_in_A"):
        value, key = {"nan_in_A": (math.nan, KA), "inf_in_B": (math.inf, KB), "neg_inf_in_A": (-math.inf, KA)}[name]
        c = _corrupt(tmp, _nan_or_inf(value, key), "")
        c.pattern = f"{_re(c.inputs[1])}: tensor '{re.escape(key)}' contains NaN or Inf \\(pass (--allow-nonfinite|allow_nonfinite=True) to merge anyway\\)"
        return c
    if name == "same_module_other_shape":
        other = write_adapter(tmp / "other", {Q: (16, 6)}, r=2, alpha=4)
        return Case([good, other], 4, f"module 'base_model.model.{re.escape(Q)}' is linear \\[8, 6\\] in {_re(good)} but linear \\[16, 6\\] in {_re(other)}")
    if name == "different_base_models":
        big = {Q: (64, 48), "model.layers.0.self_attn.v_proj": (16, 48)}
        a = write_adapter(tmp / "small_model", SMALL, r=2, alpha=4)
        b = write_adapter(tmp / "big_model", big, r=2, alpha=4)
        return Case([a, b], 4, f"in {_re(a)} but .* in {_re(b)} \\(adapters for different base models\\?\\)")
    raise KeyError(name)


INPUT_CASES = [
    "missing_file", "missing_weights_file", "dir_without_weights", "dir_without_config", "weights_is_a_directory",
    "weights_is_a_fifo", "empty_file", "truncated_1", "truncated_7", "truncated_8", "truncated_in_header",
    "truncated_header_end", "truncated_in_data", "truncated_last_byte", "header_length_larger_than_file",
    "header_length_2_63", "header_not_json", "header_not_utf8", "header_is_a_list", "header_deeply_nested",
    "header_huge_integer", "metadata_not_strings", "entry_not_an_object", "unknown_dtype", "dtype_not_a_string",
    "shape_not_a_list", "shape_negative", "shape_bytes_mismatch", "offsets_reversed", "offsets_not_ints",
    "offsets_overlap", "offsets_past_end", "huge_tensor_claim", "pickle_dir", "pickle_bin", "pickle_pt",
    "pickle_ckpt", "config_not_json", "config_not_an_object", "config_r_zero", "config_r_negative",
    "config_r_text", "config_alpha_text", "config_alpha_nan", "config_r_disagrees_with_tensors",
    "config_rank_pattern_bad_regex", "config_rank_pattern_zero", "config_peft_type", "lora_A_without_B",
    "lora_B_without_A", "rank_A_B_disagree", "factor_not_2d", "factor_integer_dtype", "no_lora_tensors",
    "nan_in_A", "inf_in_B", "neg_inf_in_A", "same_module_other_shape", "different_base_models",
]


@pytest.fixture
def alarm():
    """Fail (instead of hanging CI) if a case blocks, e.g. on opening a FIFO."""

    class Blocked(BaseException):  # not an OSError, so no handler under test can swallow it
        pass

    def on_alarm(signum, frame):
        raise Blocked("blocked for 20 s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


NOT_FOR_INSPECT = {"nan_in_A", "inf_in_B", "neg_inf_in_A", "same_module_other_shape", "different_base_models"}


@pytest.mark.parametrize("name,interface", [(n, i) for n in INPUT_CASES for i in ("cli", "api", "inspect")
                                            if not (i == "inspect" and n in NOT_FOR_INSPECT)])
def test_bad_input(tmp_path, capsys, alarm, name, interface):
    """inspect shows one adapter as it is (NaN included), so the merge-only cases are not run through it."""
    case = build_case(name, tmp_path)
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    if interface == "inspect":
        code, _, err = cli(capsys, "inspect", case.inputs[1], *case.cli)
        line = one_line(err)
        assert code == case.code, err
        msg = line.removeprefix("error: ")
    elif interface == "cli":
        code, _, err = cli(capsys, "merge", *case.inputs, "--method", case.method, *case.cli, "-o", out)
        line = one_line(err)
        assert code == case.code, err
        assert line.startswith("error: ")
        msg = line.removeprefix("error: ")
    else:
        with pytest.raises(am.AdapterMergeError) as info:
            am.merge_to(out, [str(p) for p in case.inputs], case.method, **case.api)
        assert CODES[type(info.value)] == case.code, repr(info.value)
        msg = one_line(str(info.value))
    assert re.search(case.pattern, msg), f"{msg!r} !~ {case.pattern!r}"
    assert snapshot(tmp_path) == before  # nothing written, no temporary left, inputs byte-identical


# ------------------------------------------------------------------------------------------------ parameters
# (CLI options, API keyword arguments, message pattern). The inputs do not even exist: parameters are checked
# before any file is opened, so each case must still be a ParameterError (exit 2), not an InputError.
PARAM_CASES = {
    "unknown_method": (["--method", "tie"], {"method": "tie"}, r"unknown method 'tie'; did you mean 'ties'\?"),
    "unknown_method_dash": (["--method", "dare-ties"], {"method": "dare-ties"}, r"did you mean 'dare_ties'\?"),
    "unknown_method_far": (["--method", "xyzzy"], {"method": "xyzzy"}, r"unknown method 'xyzzy' \(adaptermerge methods lists them\)"),
    "density_zero": (["--method", "ties", "--density", "0"], {"method": "ties", "density": 0.0}, r"parameter density=0\.0 is out of range \(0, 1\]"),
    "density_above_one": (["--method", "ties", "--density", "1.5"], {"method": "ties", "density": 1.5}, r"density=1\.5 is out of range \(0, 1\]"),
    "density_negative": (["--method", "dare_linear", "--density=-0.1"], {"method": "dare_linear", "density": -0.1}, r"density=-0\.1 is out of range"),
    "density_nan": (["--method", "ties", "--density", "nan"], {"method": "ties", "density": math.nan}, r"density.*(finite|nan)"),
    "density_per_input_count": (["--method", "ties", "--density", "0.5,0.5,0.5"], {"method": "ties", "density": [0.5] * 3}, r"density has 3 values for 2 inputs"),
    "weights_count": (["--weights", "1,2,3"], {"weights": [1.0, 2.0, 3.0]}, r"got 3 weights for 2 inputs"),
    "weights_not_numbers": (["--weights", "1,x"], {"weights": [1.0, "x"]}, r"weights.*'x'.*(not a number|must be a finite number)"),
    "rank_zero": (["--rank", "0"], {"rank": 0}, r"rank must be a positive integer or 'full', got 0"),
    "rank_negative": (["--rank=-4"], {"rank": -4}, r"rank must be a positive integer or 'full', got -4"),
    "rank_text": (["--rank", "big"], {"rank": "big"}, r"rank must be a positive integer or 'full', got 'big'"),
    "rank_float": (["--rank", "2.5"], {"rank": 2.5}, r"rank must be a positive integer or 'full', got '?2\.5'?"),
    "seed_negative": (["--seed=-1"], {"seed": -1}, r"seed must be a non-negative integer, got -1"),
    "seed_float": (["--seed", "1.5"], {"seed": 1.5}, r"(--seed|seed must be a non-negative integer, got 1\.5)"),
    "seed_text": (["--seed", "abc"], {"seed": "abc"}, r"(--seed|seed must be a non-negative integer, got 'abc')"),
    "svd_unknown": (["--method", "ties", "--svd", "fast"], {"method": "ties", "svd": "fast"}, r"svd must be 'randomized' or 'exact', got 'fast'"),
    "dtype_unknown": (["--dtype", "int8"], {"dtype": "int8"}, r"dtype must be one of float32, bfloat16, float16, got 'int8'"),
    "majority_sign_unknown": (["--method", "ties", "--majority-sign", "totl"], {"method": "ties", "majority_sign": "totl"},
        r"majority_sign='totl' must be one of total, frequency; did you mean 'total'\?"),
    "param_of_other_method": (["--method", "linear", "--density", "0.5"], {"method": "linear", "density": 0.5}, r"method 'linear' has no parameter 'density'"),
    "cat_with_rank": (["--method", "cat", "--rank", "4"], {"method": "cat", "rank": 4}, r"method 'cat' is an exact concatenation"),
}


@pytest.mark.parametrize("interface", ["cli", "api"])
@pytest.mark.parametrize("name", list(PARAM_CASES))
def test_bad_parameter_rejected_before_any_file_is_opened(tmp_path, capsys, name, interface):
    cli_args, api_kwargs, pattern = PARAM_CASES[name]
    ghosts = [tmp_path / "does-not-exist-1", tmp_path / "does-not-exist-2"]
    out = tmp_path / "out"
    if interface == "cli":
        code, _, err = cli(capsys, "merge", *ghosts, *cli_args, "-o", out)
        msg = one_line(err)
        assert code == 2, err
    else:
        kwargs = dict(api_kwargs)
        method = kwargs.pop("method", "linear")
        weights = kwargs.pop("weights", None)
        with pytest.raises(am.ParameterError) as info:
            am.merge_to(out, ghosts, method, weights, **kwargs)
        msg = one_line(str(info.value))
    assert re.search(pattern, msg), f"{msg!r} !~ {pattern!r}"
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Any read of tensor data fails the test: the checks must come before."""

    def boom(*args, **kwargs):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(Adapter, "raw_tensor", boom)
    monkeypatch.setattr(Adapter, "_extra_tensor", boom)


@pytest.mark.parametrize("interface", ["cli", "api"])
@pytest.mark.parametrize("where", ["subdir", "same_dir", "weights_file", "bare_file", "parent_of_input"])
def test_output_inside_or_around_an_input_refused(tmp_path, capsys, no_tensor_reads, where, interface):
    a = write_adapter(tmp_path / "a", SMALL, r=2, alpha=4)
    bare = write_adapter(tmp_path / "b.safetensors", SMALL, r=2, bare=True, metadata={"lora_alpha": "4"})
    inputs = [a, bare]
    out = {"subdir": a / "sub", "same_dir": a, "weights_file": a / "adapter_model.safetensors", "bare_file": bare,
           "parent_of_input": tmp_path}[where]
    pattern = r"output .* contains input" if where == "parent_of_input" else r"output .* is inside input"
    before = snapshot(tmp_path)
    if interface == "cli":
        code, _, err = cli(capsys, "merge", *inputs, "-o", out, "--force")
        msg = one_line(err)
        assert code == 2, err
    else:
        with pytest.raises(am.ParameterError) as info:
            am.merge_to(out, inputs, force=True)
        msg = str(info.value)
    assert re.search(pattern, msg), msg
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------ outputs
@pytest.mark.parametrize("interface", ["cli", "api"])
@pytest.mark.parametrize("case", ["exists_dir", "exists_file", "parent_is_a_file", "force_over_foreign_dir",
                                  "force_dir_over_file", "force_file_over_dir"])
def test_output_problems(tmp_path, capsys, case, interface):
    a = write_adapter(tmp_path / "a", SMALL, r=2, alpha=4)
    work = tmp_path / "work"
    work.mkdir()
    force = case.startswith("force")
    if case == "exists_dir":
        out = work / "out"
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        pattern = r"out already exists; pass " + ("--force" if interface == "cli" else "force=True") + " to replace it"
    elif case == "exists_file":
        out = work / "out.safetensors"
        out.write_bytes(b"mine")
        pattern = r"out\.safetensors already exists; pass " + ("--force" if interface == "cli" else "force=True") + " to replace it"
    elif case == "parent_is_a_file":
        (work / "plain").write_text("a regular file")
        out = work / "plain" / "out"
        pattern = rf"{re.escape(str(work / 'plain'))}: is a file, not a folder: cannot create the output folder"
    elif case == "force_over_foreign_dir":
        out = work / "photos"
        (out / "2019").mkdir(parents=True)
        (out / "2019" / "beach.jpg").write_bytes(b"\xff\xd8")
        (out / "notes.txt").write_text("precious")
        pattern = r"photos is not an adapter directory .*refusing to replace it"
    elif case == "force_dir_over_file":
        out = work / "out"
        out.write_text("a file")
        pattern = r"out is a file; a PEFT adapter output must be a directory"
    else:
        out = work / "out.safetensors"
        out.mkdir()
        pattern = r"out\.safetensors is a directory; cannot replace it with a file"
    before = snapshot(tmp_path)
    if interface == "cli":
        code, _, err = cli(capsys, "merge", a, "-o", out, *(["--force"] if force else []))
        msg = one_line(err)
        assert code == 5, err
    else:
        with pytest.raises(am.OutputError) as info:
            am.merge_to(out, [a], force=force)
        msg = str(info.value)
    assert re.search(pattern, msg), msg
    assert snapshot(tmp_path) == before


def test_force_replaces_a_previous_output_and_an_empty_dir(tmp_path, capsys):
    a = write_adapter(tmp_path / "a", SMALL, r=2, alpha=4)
    b = write_adapter(tmp_path / "b", SMALL, r=2, alpha=4, seed=5)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(capsys, "merge", a, "-o", empty, "-q", "--force")[0] == 0
    assert cli(capsys, "merge", b, "-o", empty, "-q", "--force")[0] == 0
    want = read_deltas(b)
    got = read_deltas(empty)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "empty"]


# ------------------------------------------------------------------------------------------------ pickle
class _Payload:
    """Unpickling this creates ``marker``: proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("interface", ["cli", "api", "inspect"])
def test_pickle_files_are_never_unpickled(tmp_path, capsys, interface):
    marker = tmp_path / "PWNED"
    evil = pickle.dumps({"base_model.model.m.q.lora_A.weight": _Payload(marker)})
    d = tmp_path / "bin_dir"
    d.mkdir()
    (d / "adapter_model.bin").write_bytes(evil)
    (d / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 4}')
    pt = tmp_path / "adapter.pt"
    torch.save({"x": _Payload(marker)}, pt)  # a real torch zip checkpoint with a code-running pickle inside
    disguised = tmp_path / "disguised"
    disguised.mkdir()
    shutil.copy(pt, disguised / "adapter_model.safetensors")
    (disguised / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 4}')
    marker.unlink(missing_ok=True)  # torch.save does not unpickle, but be sure
    before = snapshot(tmp_path)
    expected = {d: "pickle files are never unpickled; convert", pt: "pickle-based checkpoints are never unpickled",
                disguised: "header claims .* bytes but the file has only|not valid JSON"}
    for path, pattern in expected.items():
        if interface == "cli":
            code, _, err = cli(capsys, "merge", path, "--alpha", "4", "-o", tmp_path / "out")
            assert code == 3, err
            msg = one_line(err)
        elif interface == "inspect":
            code, _, err = cli(capsys, "inspect", path)
            assert code == 3, err
            msg = one_line(err)
        else:
            with pytest.raises(am.InputError) as info:
                am.load_adapter(path, alpha=4)
            msg = str(info.value)
        assert re.search(pattern, msg), msg
        assert not marker.exists()
    assert snapshot(tmp_path) == before


def test_package_has_no_unpickling_call():
    """Static guarantee behind the docs: no torch.load / pickle / numpy allow_pickle anywhere in adaptermerge."""
    banned_modules = {"pickle", "cPickle", "dill", "joblib", "marshal", "shelve", "cloudpickle"}
    found = []
    for src in sorted(PKG.rglob("*.py")):
        tree = ast.parse(src.read_text(), filename=str(src))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [f"{src.name}: import {a.name}" for a in node.names if a.name.split(".")[0] in banned_modules]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in banned_modules:
                found.append(f"{src.name}: from {node.module}")
            elif isinstance(node, ast.Attribute) and node.attr == "load" and isinstance(node.value, ast.Name) \
                    and node.value.id in {"torch", "np", "numpy"}:
                found.append(f"{src.name}:{node.lineno}: {node.value.id}.load")
            elif isinstance(node, ast.keyword) and node.arg == "allow_pickle":
                found.append(f"{src.name}:{node.lineno}: allow_pickle")
    assert found == []


# ------------------------------------------------------------------------------------------------ unreadable
def test_unreadable_file_and_folder(tmp_path):
    """Permission denied on the weights file, and on the adapter folder itself.

    root ignores permission bits, so as root the failing calls run in a child that first drops to uid 65534.
    """
    base = Path(tempfile.mkdtemp(prefix="am-perm-"))  # /tmp/pytest-of-root is 0700: the child must reach this
    try:
        base.chmod(0o755)
        f = adapter_dir(base / "file_locked")
        (f / "adapter_model.safetensors").chmod(0o000)
        g = adapter_dir(base / "dir_locked")
        g.chmod(0o000)
        before = snapshot(f)
        code = f"""
import json, os, sys, io, contextlib
import adaptermerge as am
from adaptermerge.cli import main
# import everything (the CLI imports lazily) while still privileged: the interpreter lives under /root
am.merge_to({str(base / 'warm')!r}, [{str(tmp_path / 'warm')!r}])
with contextlib.redirect_stderr(io.StringIO()):
    main(["merge", {str(tmp_path / 'warm')!r}, "-o", {str(base / 'warm2')!r}, "-q"])
    main(["merge", {str(base / 'nope')!r}, "-o", {str(base / 'warm3')!r}])
if os.geteuid() == 0:
    os.setgid(65534); os.setuid(65534)
res = []
for path in ({str(f)!r}, {str(g)!r}):
    try:
        am.merge_to({str(base / 'out')!r}, [path])
        res.append(["ok", ""])
    except am.AdapterMergeError as e:
        res.append([type(e).__name__, str(e)])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["merge", path, "-o", {str(base / 'out2')!r}])
    res.append([rc, err.getvalue()])
print(json.dumps(res))
"""
        adapter_dir(tmp_path / "warm")
        r = run_child(code)
        assert r.returncode == 0, r.stderr
        (api_f, cli_f, api_g, cli_g) = json.loads(r.stdout)
        assert api_f == ["InputError", f"{f / 'adapter_model.safetensors'}: cannot open: Permission denied"]
        assert cli_f[0] == 3 and one_line(cli_f[1]) == f"error: {api_f[1]}"
        assert api_g[0] == "InputError" and str(g) in api_g[1] and "Permission denied" in api_g[1], api_g
        assert cli_g[0] == 3 and one_line(cli_g[1]) == f"error: {api_g[1]}"
        assert not (base / "out").exists() and not (base / "out2").exists()
        (f / "adapter_model.safetensors").chmod(0o644)
        assert snapshot(f) == before
    finally:
        for p in base.rglob("*"):
            if p.is_dir():
                p.chmod(0o755)
        g.chmod(0o755)
        shutil.rmtree(base)


def run_child(code: str, *, preexec_fn=None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          preexec_fn=preexec_fn, timeout=timeout)


# ------------------------------------------------------------------------------------------------ config notes
def test_rank_pattern_key_matching_nothing_is_a_warning(tmp_path, capsys):
    """PEFT itself ignores such a key (it may name modules that were not targeted), so it is not an error; r and
    alpha still fully determine every module's scale. The CLI shows it as a note, the API in adapter.notes."""
    a = write_adapter(tmp_path / "a", SMALL, r=2, alpha=6, rank_pattern={"k_proj": 8}, alpha_pattern={"o_proj": 3})
    ad = am.load_adapter(a)
    assert "rank_pattern key 'k_proj' matches no module in this adapter" in ad.notes
    assert "alpha_pattern key 'o_proj' matches no module in this adapter" in ad.notes
    assert {m.scale for m in ad.modules.values()} == {3.0}
    code, _, err = cli(capsys, "merge", a, "-o", tmp_path / "out")
    assert code == 0, err
    assert f"note: {a}: rank_pattern key 'k_proj' matches no module in this adapter" in err
    want = read_deltas(a)
    got = read_deltas(tmp_path / "out")
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ NaN / Inf
def _poisoned(tmp: Path, value: float, scale: float = 1.0) -> Path:
    header, data = valid_parts()
    d = adapter_dir(tmp, _nan_or_inf(value, KA)(header, data) if value != 0 else raw_safetensors(header, data))
    if scale != 1.0:
        t = {k: v * scale for k, v in _load(d).items()}
        save_file(t, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    return d


def _load(d: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(d / "adapter_model.safetensors") if d.is_dir() else str(d), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_allow_nonfinite(tmp_path, capsys):
    bad = _poisoned(tmp_path / "nan", math.nan)
    before = snapshot(tmp_path)
    # refused by default (covered for every method by test_bad_input); allowed with the flag by exact methods:
    code, _, err = cli(capsys, "merge", bad, "--method", "cat", "--allow-nonfinite", "-o", tmp_path / "cat", "-q")
    assert code == 0, err
    a_out = _load(tmp_path / "cat")[KA]
    assert torch.isnan(a_out[0, 3]) and torch.isfinite(a_out).sum() == a_out.numel() - 1
    code, _, err = cli(capsys, "merge", bad, "--allow-nonfinite", "--rank", "full", "-o", tmp_path / "full", "-q")
    assert code == 0, err
    # ... and methods that need an SVD or magnitude selection say so, naming the module and the input
    for method in ("linear", "ties", "dare_linear"):
        out = tmp_path / f"o_{method}"
        code, _, err = cli(capsys, "merge", bad, "--method", method, "--allow-nonfinite", "-o", out)
        assert code == 3, err
        assert re.search(rf"module 'base_model\.model\.{re.escape(Q)}': method '{method}' cannot merge the NaN/Inf "
                         rf"values of {re.escape(str(bad))} \(allowed by --allow-nonfinite\)", one_line(err)), err
        assert not out.exists()
        with pytest.raises(am.InputError, match="cannot merge the NaN/Inf values"):
            am.merge_to(out, [bad], method, allow_nonfinite=True)
    shutil.rmtree(tmp_path / "cat")
    shutil.rmtree(tmp_path / "full")
    assert snapshot(tmp_path) == before


def test_finite_inputs_that_overflow(tmp_path, capsys):
    """Finite but huge factors (1e30): scale*B@A overflows float32 (element-wise methods), or the merged factors do
    not fit the requested output dtype. One-line errors, nothing written, instead of Inf in the output."""
    big = _poisoned(tmp_path / "big", 0, scale=1e30)
    before = snapshot(tmp_path)
    cases = [(["--method", "ties"], 3, rf"{re.escape(str(big))}: module '.*q_proj': scale \* B @ A overflows float32"),
             (["--method", "dare_linear", "--rank", "full"], 3, rf"{re.escape(str(big))}: module '.*q_proj': .*overflow float32"),
             (["--dtype", "float16"], 5, r"module '.*q_proj': merged '.*lora_[AB]\.weight' holds values up to .* which do not fit float16 .*use --dtype float32 or bfloat16")]
    for args, want, pattern in cases:
        code, _, err = cli(capsys, "merge", big, *args, "-o", tmp_path / "out")
        assert code == want, err
        assert re.search(pattern, one_line(err)), err
    # the linear path is exact in float64 and the output fits float32: merged fine
    code, _, err = cli(capsys, "merge", big, "-o", tmp_path / "ok", "-q")
    assert code == 0, err
    shutil.rmtree(tmp_path / "ok")
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------ huge claims
def _limit_memory(gib: int):
    def pre() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (gib << 30, gib << 30))

    return pre


HUGE_DRIVER = """
import json, sys
import adaptermerge as am
res = {}
for name, path, method in json.loads(sys.argv[1]):
    try:
        am.merge_to(path + "-" + name, [path], method)
        res[name] = ["ok", ""]
    except am.AdapterMergeError as e:
        res[name] = [type(e).__name__, str(e)]
    except BaseException as e:  # MemoryError, torch allocation failures: the bug this test is about
        res[name] = [type(e).__name__, str(e)[:300]]
print(json.dumps(res))
"""


def test_huge_claims_never_allocate(tmp_path):
    """Three ways a small file can claim terabytes, run in a child capped at 3 GiB of address space, so that any
    attempt to allocate what is claimed fails loudly (MemoryError) instead of being silently absorbed:

    * a header whose tensor needs 8 TiB while the file has a few hundred bytes (rejected by header validation);
    * a sparse file that really is 128 GiB long, with a valid header (rejected before read_tensor allocates);
    * two small valid factors (1 x 10^6 and 10^6 x 1, 8 MB) of a 10^6 x 10^6 module: an element-wise merge would
      need 4 TB per dense delta (refused at plan time); the exact low-rank linear merge of the same file works.
    """
    header, data = valid_parts()
    claim = adapter_dir(tmp_path / "claim", _huge_tensor(header, data))
    sparse = tmp_path / "sparse"
    n = 2**37  # 128 GiB of float32
    big_header = {KA: {"dtype": "F32", "shape": [1, n // 4], "data_offsets": [0, n]},
                  KB: {"dtype": "F32", "shape": [8, 1], "data_offsets": [n, n + 32]}}
    adapter_dir(sparse, raw_safetensors(big_header, b""), config={"r": 1, "lora_alpha": 1})
    with open(sparse / "adapter_model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) + n + 32)  # a hole: no disk used
    wide = write_adapter(tmp_path / "wide", {"m.q": (10**6, 10**6)}, r=1, alpha=1)
    jobs = [["claim", str(claim), "linear"], ["sparse", str(sparse), "linear"], ["wide_ties", str(wide), "ties"],
            ["wide_dare", str(wide), "dare_linear"], ["wide_linear", str(wide), "linear"]]
    r = run_child(HUGE_DRIVER.replace("sys.argv[1]", repr(json.dumps(jobs))), preexec_fn=_limit_memory(3))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["claim"][0] == "InputError" and "data runs past the end of the file" in res["claim"][1]
    assert res["sparse"][0] == "InputError", res["sparse"]
    assert re.search(r"tensor '.*lora_A\.weight' is 128\.0 GiB, more than the 3\.0 GiB of memory", res["sparse"][1])
    for job in ("wide_ties", "wide_dare"):
        assert res[job][0] == "InputError", res[job]
        assert re.search(r"module 'base_model\.model\.m\.q' \(1000000x1000000\) needs about .* GiB of memory for "
                         r"method '(ties|dare_linear)' \(dense deltas\), more than the 3\.0 GiB", res[job][1]), res[job]
        assert not Path(f"{wide}-{job}").exists()
    assert res["wide_linear"] == ["ok", ""]
    # the low-rank result is exact: check it on random probe vectors (the dense delta is never formed)
    with safe_open(str(wide / "adapter_model.safetensors"), "pt") as f:
        a, b = f.get_tensor("base_model.model.m.q.lora_A.weight"), f.get_tensor("base_model.model.m.q.lora_B.weight")
    with safe_open(str(Path(f"{wide}-wide_linear") / "adapter_model.safetensors"), "pt") as f:
        a2, b2 = f.get_tensor("base_model.model.m.q.lora_A.weight"), f.get_tensor("base_model.model.m.q.lora_B.weight")
    x = torch.randn(10**6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = b.double() @ (a.double() @ x)  # scale alpha/r = 1
    got = b2.double() @ (a2.double() @ x)
    assert float((got - want).norm() / want.norm()) < 1e-5


# ------------------------------------------------------------------------------------------------ disk full
MID = {f"model.layers.{i}.mlp.up_proj": (64, 48) for i in range(8)}

DISK_FULL_DRIVER = """
import io, json, resource, signal, sys, contextlib
import adaptermerge as am
from adaptermerge.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so write() fails with EFBIG instead of killing the process
res = []
for limit, argv, api in json.loads(sys.argv[1]):
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    try:
        am.merge_to(api[0], api[1], force=True)
        outcome = ["ok", ""]
    except am.AdapterMergeError as e:
        outcome = [type(e).__name__, str(e)]
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    res.append([code, err.getvalue(), outcome])
print(json.dumps(res))
"""


def test_disk_full_during_write(tmp_path):
    """RLIMIT_FSIZE (SIGXFSZ ignored) makes write() fail with EFBIG like a full disk: while tensors stream into
    the spool file, or only at the very end, when header + data go into the final file; for a folder and a
    single-file output; CLI and API. Exit 5, one line, no partial output, no temporary file, inputs untouched, and
    the existing output that --force was replacing survives byte for byte."""
    a = write_adapter(tmp_path / "a", MID, r=4, seed=1)
    b = write_adapter(tmp_path / "b", MID, r=4, seed=2)
    jobs = []
    for target in ("dir", "file"):
        ref = tmp_path / ("ref" if target == "dir" else "ref.safetensors")
        am.merge_to(ref, [a, b])
        raw = (ref / "adapter_model.safetensors" if target == "dir" else ref).read_bytes()
        data_bytes = len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]
        out = tmp_path / ("out" if target == "dir" else "out.safetensors")
        am.merge_to(out, [a])  # an older output that --force would replace
        # spool phase: a third of the data fits; final phase: the spool fits, header + data does not
        for limit in (data_bytes // 3, data_bytes + 8):
            jobs.append([limit, ["merge", str(a), str(b), "-o", str(out), "--force", "-q"], [str(out), [str(a), str(b)]]])
    before = snapshot(tmp_path)
    r = run_child(DISK_FULL_DRIVER.replace("sys.argv[1]", repr(json.dumps(jobs))))
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    assert len(results) == 4
    for code, err, (kind, msg) in results:
        assert code == 5, err
        assert re.fullmatch(r"error: .*/out(\.safetensors)?: write failed: File too large", one_line(err)), err
        assert kind == "OutputError" and one_line(err) == f"error: {msg}"
    assert snapshot(tmp_path) == before


def test_stale_temporaries_of_dead_processes_are_cleaned(tmp_path):
    from adaptermerge.safetensors_io import TEMP_PREFIX, _host_tag, clean_stale_temps

    host = _host_tag()
    other_host = "0" * 8 if host != "0" * 8 else "1" * 8
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid is free
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    folder = tmp_path / "outputs"
    folder.mkdir()
    removable = [f"{TEMP_PREFIX}{dead.pid}-{host}-abc.spool", f"{TEMP_PREFIX}{dead.pid}-{host}-dirxyz",
                 f"{TEMP_PREFIX}{zombie.pid}-{host}-qq.safetensors", f"{TEMP_PREFIX}{dead.pid}-{host}-old-k"]
    kept = [f"{TEMP_PREFIX}{os.getpid()}-{host}-mine.spool",  # this process: maybe in use right now
            f"{TEMP_PREFIX}{os.getppid()}-{host}-parent.spool",  # a live process
            f"{TEMP_PREFIX}{dead.pid}-{other_host}-nfs.spool",  # another machine sharing the folder
            ".adaptermerge-tmp-legacy12.spool",  # no owner in the name: never touched
            "notes.txt", "adapter_model.safetensors"]
    for name in removable + kept:
        p = folder / name
        if "dir" in name or "old" in name:
            p.mkdir()
            (p / "adapter_model.safetensors").write_bytes(b"partial")
        else:
            p.write_bytes(b"partial")
    try:
        removed = clean_stale_temps(folder)
    finally:
        zombie.wait()
    assert sorted(p.name for p in removed) == sorted(removable)
    assert sorted(p.name for p in folder.iterdir()) == sorted(kept)


# ------------------------------------------------------------------------------------------------ not writable
NOT_WRITABLE_DRIVER = """
import io, json, os, contextlib
import adaptermerge as am
from adaptermerge.cli import main
am.merge_to({warm_out!r}, [{inp!r}])
with contextlib.redirect_stderr(io.StringIO()):
    main(["merge", {inp!r}, "-o", {warm_out2!r}, "-q"])
if os.geteuid() == 0:  # root writes anywhere: drop to nobody, the folder is root's and 0755
    os.setgid(65534); os.setuid(65534)
res = []
for out in ({out_dir!r}, {out_file!r}):
    try:
        am.merge_to(out, [{inp!r}])
        res.append(["ok", ""])
    except am.AdapterMergeError as e:
        res.append([type(e).__name__, str(e)])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["merge", {inp!r}, "-o", out])
    res.append([rc, err.getvalue()])
print(json.dumps(res))
"""


def test_output_folder_not_writable(tmp_path):
    base = Path(tempfile.mkdtemp(prefix="am-ro-"))
    try:
        base.chmod(0o755)
        inp = adapter_dir(base / "in")
        for p in (inp, *inp.iterdir()):
            p.chmod(0o755 if p.is_dir() else 0o644)
        locked = base / "locked"
        locked.mkdir()
        locked.chmod(0o755 if os.geteuid() == 0 else 0o555)
        before = snapshot(base)
        code = NOT_WRITABLE_DRIVER.format(warm_out=str(base / "warm"), warm_out2=str(base / "warm2"), inp=str(inp),
                                          out_dir=str(locked / "out"), out_file=str(locked / "out.safetensors"))
        r = run_child(code)
        assert r.returncode == 0, r.stderr
        api_dir, cli_dir, api_file, cli_file = json.loads(r.stdout)
        for api, cli_res in ((api_dir, cli_dir), (api_file, cli_file)):
            assert api == ["OutputError", f"{locked}: output folder is not writable"]
            assert cli_res[0] == 5 and one_line(cli_res[1]) == f"error: {api[1]}"
        after = snapshot(base)
        assert {k: v for k, v in after.items() if not k.startswith("warm")} == \
            {k: v for k, v in before.items() if not k.startswith("warm")}
    finally:
        locked.chmod(0o755)
        shutil.rmtree(base)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real file system of 96 KiB (needs mount permission; otherwise RLIMIT_FSIZE above covers the code path)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k,mode=0755", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN); disk-full is covered by test_disk_full_during_write")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_real_disk_full_and_read_only_file_system(tmp_path, capsys, tiny_tmpfs):
    # 57 KB of tensor data: the spool fits in 96 KiB, spool + final file do not (fails at commit);
    # 229 KB: fails while streaming into the spool
    a = write_adapter(tmp_path / "a", MID, r=16, seed=1)
    b = write_adapter(tmp_path / "b", MID, r=64, seed=1)
    before = snapshot(tmp_path / "a")
    for src, out in ((a, tiny_tmpfs / "out"), (a, tiny_tmpfs / "out.safetensors"), (b, tiny_tmpfs / "out")):
        code, _, err = cli(capsys, "merge", src, "-o", out)
        assert code == 5, err
        assert one_line(err) == f"error: {out}: write failed: No space left on device", err
        assert list(tiny_tmpfs.iterdir()) == []
        with pytest.raises(am.OutputError, match="No space left on device"):
            am.merge_to(out, [src])
        assert list(tiny_tmpfs.iterdir()) == []
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
    code, _, err = cli(capsys, "merge", a, "-o", tiny_tmpfs / "out")
    assert code == 5 and one_line(err) == f"error: {tiny_tmpfs}: output folder is not writable", err
    assert snapshot(tmp_path / "a") == before
