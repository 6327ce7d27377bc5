"""LoRA fine-tuning of a causal LM on tokenised (prompt, answer) examples, shared by the recipes.

:func:`train_lora_encoded` trains one LoRA adapter on :class:`EncodedExample` rows (prompt + answer token ids, loss
on the answer only) and saves it as an ordinary PEFT adapter directory. The recipes turn their own data into
EncodedExamples (WeaveRec: :func:`weaverec.train.train_lora`; task merging: ``taskmerge.pipeline``).

* Loss: next-token NLL on the answer tokens only (answer + end-of-turn token), averaged over all answer tokens of an
  optimizer step (across micro-batches and processes), so results do not depend on how a step is split into
  micro-batches or devices.
* Batches: each epoch, a seeded permutation is cut into windows, each window sorted by length and cut into
  micro-batches, and the micro-batch order shuffled (seeded). Rows are left-padded; logits are computed only for
  the answer positions (``logits_to_keep``), which saves most of the LM-head cost and memory.
* Devices: ``accelerate.Accelerator`` does device placement, DDP wrapping and main-process-only saving, so the
  same code runs as a plain CPU process or under ``torchrun`` / ``accelerate launch`` on many GPUs or nodes.
  ``batch_size`` is per process; the effective batch is batch_size x grad_accum x processes. Every process builds
  the same global batch list and takes every n-th micro-batch. With several nodes, ``out_dir`` must be on a
  filesystem the global main process writes and all callers read.
* Output (written to a hidden temporary sibling, then renamed): ``adapter_model.safetensors``,
  ``adapter_config.json`` (PEFT) and ``train_log.json`` (config, data fingerprint, loss curve, timing). If
  ``out_dir`` already holds a finished adapter trained with the same config and data, it is returned without
  training; a finished adapter with another config or data is an error (nothing is overwritten).
* Threads: torch's thread count is left to the caller (``OMP_NUM_THREADS`` / ``torch.set_num_threads``); it is
  recorded in ``train_log.json``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptermerge.errors import InputError, OutputError, ParameterError

from .llm import _versions, atomic_dir_write, count_parameters, load_tokenizer, torch_dtype
from .scoring import _decoder, _layer_slice, _pad_left, bar_label, position_ids_from_mask, progress_bar
from .types import IGNORE_INDEX, EncodedExample

ALL_PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LOG_NAME = "train_log.json"
LOG_FORMAT = 1
_WINDOW_BATCHES = 50  # micro-batches per length-sorting window


@dataclass(frozen=True)
class LoraTrainConfig:
    """LoRA training settings shared by the recipes. Defaults follow WeaveRec's authors (r 16, alpha 32, dropout 0.05,
    all 7 projections, lr 2e-4 cosine with 5% warmup, 2 epochs, seed 42). ``max_steps`` (optimizer steps), when
    set, overrides epochs. Recipes subclass it to add their own fields (appended after these, so the saved config
    keeps its key order) and may override :meth:`peft_options` to pass more ``peft.LoraConfig`` arguments.

    ``layers`` restricts the LoRA to these decoder layer indices (PEFT ``layers_to_transform``; None = every layer,
    as the authors do). LoRA on the top layers only is much cheaper on CPU: the backward pass stops at the lowest
    adapted layer. ``dtype`` is the storage dtype of the frozen base weights ("float32", "bfloat16", "float16";
    LoRA weights stay float32); ``mixed_precision`` is passed to accelerate ("no", "bf16", "fp16").
    ``gradient_checkpointing`` recomputes activations in the backward pass: same result, about a third more compute,
    far less memory (SmolLM2, batch 8 x ~420 tokens: ~5.7 GB peak instead of > 14 GB).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ALL_PROJECTIONS
    layers: tuple[int, ...] | None = None
    lr: float = 2e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epochs: int = 2
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    max_seq_len: int = 512
    seed: int = 42
    dtype: str = "float32"
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.r >= 1, f"r must be >= 1, got {self.r}"),
            (self.alpha > 0, f"alpha must be > 0, got {self.alpha}"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (len(self.target_modules) > 0, "target_modules must name at least one module"),
            (self.layers is None or (len(self.layers) > 0 and min(self.layers) >= 0),
             f"layers must be None or non-negative layer indices, got {self.layers}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.max_seq_len >= 8, f"max_seq_len must be >= 8, got {self.max_seq_len}"),
            (self.mixed_precision in ("no", "bf16", "fp16"), f"mixed_precision must be no, bf16 or fp16, "
             f"got {self.mixed_precision!r}"),
            *self._extra_checks(),
        ]
        for ok, message in checks:
            if not ok:
                raise ParameterError(f"{type(self).__name__}: {message}")
        torch_dtype(self.dtype)
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted(set(int(i) for i in self.layers))))

    def _extra_checks(self) -> list[tuple[bool, str]]:
        """(condition, message) pairs a subclass adds to the validation."""
        return []

    def peft_options(self) -> dict:
        """Extra ``peft.LoraConfig`` keyword arguments (none here; a subclass may add e.g. ``use_rslora``)."""
        return {}

    def to_json(self) -> dict:
        """The config as plain JSON values (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def _convert(cls, values: dict) -> dict:
        """Turn plain values into field values (a subclass converts its nested configs here)."""
        for key in ("target_modules", "layers"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return values

    @classmethod
    def from_dict(cls, values: dict):
        """Build from plain values (YAML/JSON/TOML/CLI). Unknown keys are a ParameterError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ParameterError(f"unknown LoRA training option(s): {', '.join(unknown)}")
        return cls(**cls._convert(dict(values)))


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train_lora` did. ``resumed`` is True when a finished adapter was returned without training."""

    adapter_dir: Path
    resumed: bool
    steps: int
    losses: tuple[float, ...]
    seconds: float
    samples_per_second: float
    n_samples: int
    trainable_parameters: int

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    @classmethod
    def from_log(cls, adapter_dir: Path, log: dict, resumed: bool) -> TrainResult:
        return cls(
            adapter_dir=Path(adapter_dir),
            resumed=resumed,
            steps=int(log["steps"]),
            losses=tuple(float(x) for x in log["losses"]),
            seconds=float(log["seconds"]),
            samples_per_second=float(log["samples_per_second"]),
            n_samples=int(log["n_samples"]),
            trainable_parameters=int(log["trainable_parameters"]),
        )


# ------------------------------------------------------------------------------------------------------ data plan
def epoch_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, world_size: int = 1
) -> list[list[int]]:
    """The global micro-batch plan of one epoch (lists of sample indices), identical on every process.

    Seeded permutation -> windows of ``50 * batch_size`` samples sorted by length (longest first) -> micro-batches
    -> seeded shuffle of the micro-batch order. Padded by repeating leading batches to a multiple of
    ``world_size`` so every process runs the same number of steps.
    """
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    window = batch_size * _WINDOW_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(perm), window):
        chunk = sorted(perm[start : start + window].tolist(), key=lambda i: -lengths[i])
        batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    order = rng.permutation(len(batches))
    batches = [batches[i] for i in order]
    short = (-len(batches)) % world_size
    return batches + batches[:short]


def collate_left(examples: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor | int]:
    """Left-padded batch; ``labels`` covers only the last ``keep - 1`` positions (where all answers lie).

    ``keep`` = longest answer + 1: the model's logits for the last ``keep`` positions predict the tokens of the last
    ``keep - 1`` positions, which hold every row's answer (rows end with their answer).
    """
    width = max(len(e.input_ids) for e in examples)
    keep = max(e.n_answer_tokens for e in examples) + 1
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, width - n :] = torch.tensor(e.input_ids)
        mask[i, width - n :] = 1
        labels[i, width - n :] = torch.tensor(e.labels)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        "labels": labels[:, width - keep + 1 :],
        "keep": keep,
    }


# ---------------------------------------------------------------------------------------------------- resume logic
def _read_log(out_dir: Path) -> dict | None:
    """The train log of a finished adapter in ``out_dir``, or None when there is none."""
    needed = [out_dir / "adapter_config.json", out_dir / "adapter_model.safetensors", out_dir / LOG_NAME]
    if not all(p.is_file() for p in needed):
        return None
    try:
        return json.loads((out_dir / LOG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {out_dir / LOG_NAME}: {exc}") from exc


def _check_resume(out_dir: Path, log: dict, cfg: LoraTrainConfig, fingerprint: str) -> None:
    if log.get("config") != cfg.to_json():
        saved = log.get("config") or {}
        diff = sorted(k for k in set(saved) | set(cfg.to_json()) if saved.get(k) != cfg.to_json().get(k))
        raise OutputError(f"{out_dir} holds an adapter trained with another config ({', '.join(diff)} differ); "
                          "remove it or choose another output directory")
    if log.get("data_fingerprint") != fingerprint:
        raise OutputError(f"{out_dir} holds an adapter trained on other samples; remove it or choose another "
                          "output directory")


# --------------------------------------------------------------------------------------------------------- training
def _build_model(base_model_dir: Path, cfg: LoraTrainConfig):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            base_model_dir, dtype=torch_dtype(cfg.dtype), local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the base model from {base_model_dir}: {exc}") from exc
    model.config.use_cache = False
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if cfg.layers is not None and n_layers is not None and max(cfg.layers) >= n_layers:
        raise ParameterError(f"LoRA layers {list(cfg.layers)} out of range: {base_model_dir} has {n_layers} layers")
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing: no need to make the embeddings require grad, so the backward pass still
        # stops at the lowest adapted layer when ``layers`` is set.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(
        **cfg.peft_options(),
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        layers_to_transform=list(cfg.layers) if cfg.layers is not None else None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise ParameterError(
            f"LoRA target_modules {list(cfg.target_modules)} do not fit {base_model_dir}: {exc}"
        ) from exc


def _step_groups(batches: list[list[int]], grad_accum: int) -> list[list[list[int]]]:
    return [batches[i : i + grad_accum] for i in range(0, len(batches), grad_accum)]


def _answer_nll(model, batch: dict, device) -> torch.Tensor:
    """Summed NLL of the answer tokens of one left-padded batch (logits only for the answer tail).

    With ``inputs_embeds`` in the batch (cached hidden states entering layer ``batch["first_layer"]``), only the
    layers from there up run.
    """
    common = {
        "attention_mask": batch["attention_mask"].to(device),
        "position_ids": batch["position_ids"].to(device),
        "logits_to_keep": batch["keep"],
    }
    if "inputs_embeds" in batch:
        inner, _ = _decoder(_unwrap_base(model))
        with _layer_slice(inner, batch["first_layer"], None, final_norm=True):
            out = model(inputs_embeds=batch["inputs_embeds"].to(device), **common)
    else:
        out = model(input_ids=batch["input_ids"].to(device), **common)
    logits = out.logits[:, :-1, :].float()
    labels = batch["labels"].to(device)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _unwrap_base(model):
    """The plain causal LM inside a (DDP-wrapped) PeftModel."""
    inner = getattr(model, "module", model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


@torch.inference_mode()
def prefix_states(model, examples: Sequence[EncodedExample], first_layer: int, pad_id: int,
                  batch_size: int = 16, memo: dict | None = None) -> list[torch.Tensor]:
    """Hidden states entering decoder layer ``first_layer`` of each example (its own tokens only, (len, hidden)).

    Layers below ``first_layer`` carry no LoRA and are frozen, so these states never change during training: they
    are computed once and training runs only the layers from ``first_layer`` up (same loss and gradients, up to
    float rounding). ``memo`` (a dict the caller keeps, for one base model) carries the states over to later
    calls: an example whose token ids were seen before, e.g. by another module trained on the same sample, is not
    recomputed.
    """
    base = _unwrap_base(model)
    inner, _ = _decoder(base)
    device = next(base.parameters()).device
    out: list[torch.Tensor | None] = [None] * len(examples)
    if memo is not None:
        for i, e in enumerate(examples):
            out[i] = memo.get((first_layer, tuple(e.input_ids)))
    order = sorted((i for i in range(len(examples)) if out[i] is None), key=lambda i: len(examples[i].input_ids))
    was_training = base.training
    base.eval()
    try:
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            ids, mask = _pad_left([examples[i].input_ids for i in idx], pad_id, device)
            with _layer_slice(inner, 0, first_layer, final_norm=False):
                h = inner(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                          use_cache=False).last_hidden_state
            for r, i in enumerate(idx):
                n = len(examples[i].input_ids)
                out[i] = h[r, h.shape[1] - n :].detach().clone()
                if memo is not None:
                    memo[(first_layer, tuple(examples[i].input_ids))] = out[i]
    finally:
        base.train(was_training)
    return out  # type: ignore[return-value]


def _with_prefix(batch: dict, states: Sequence[torch.Tensor], first_layer: int) -> dict:
    """Add left-padded cached hidden states (zeros on padding) to a collated batch."""
    width = batch["input_ids"].shape[1]
    emb = torch.zeros((len(states), width, states[0].shape[-1]), dtype=states[0].dtype)
    for r, h in enumerate(states):
        emb[r, width - h.shape[0] :] = h
    return {**batch, "inputs_embeds": emb, "first_layer": first_layer}


def _accumulate_gradients(model, accelerator, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward over the micro-batches of one optimizer step; returns (summed NLL, global answer-token count).

    Gradients are those of the mean NLL per answer token over the whole step on all processes: each micro-batch's
    summed NLL is divided by the global token count and multiplied by the process count (DDP averages gradients
    over processes). Gradient all-reduce happens only on the last micro-batch.
    """
    device = accelerator.device
    local = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    n_tokens = accelerator.reduce(torch.tensor(local, device=device), reduction="sum").clamp(min=1)
    nll_total = torch.zeros((), device=device)
    for j, batch in enumerate(batches):
        with nullcontext() if j == len(batches) - 1 else accelerator.no_sync(model):
            nll = _answer_nll(model, batch, device)
            accelerator.backward(nll * accelerator.num_processes / n_tokens)
        nll_total += nll.detach()
    return nll_total, n_tokens


def _make_accelerator(cfg: LoraTrainConfig):
    """An Accelerator for this process. Under torchrun/accelerate launch on machines without GPUs, accelerate only
    sets up CPU data parallelism (gloo) when asked with ``cpu=True``; ask exactly then, so a plain run still uses
    whatever device accelerate picks."""
    from accelerate import Accelerator

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("LOCAL_RANK") is not None
    gpu = torch.cuda.is_available() or bool(getattr(torch, "xpu", None) and torch.xpu.is_available())
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=launched and not gpu)


def _save_adapter(accelerator, model, out_dir: Path, log: dict) -> None:
    """Main process writes the PEFT adapter and train log atomically; every process waits for it."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)

        def write(tmp: Path) -> None:
            unwrapped.save_pretrained(tmp)
            (tmp / LOG_NAME).write_text(json.dumps(log, indent=1) + "\n")

        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # an empty placeholder; the rename below needs the name free on every platform
        atomic_dir_write(out_dir, write)
    accelerator.wait_for_everyone()


def train_lora_encoded(
    base_model_dir: Path,
    encode: Callable[[Any], tuple[Sequence[EncodedExample], dict]],
    out_dir: Path,
    cfg: LoraTrainConfig,
    *,
    fingerprint: str,
    n_samples: int,
    cache_prefix: bool = False,
    prefix_memo: dict | None = None,
    progress: bool = True,
    label: str | None = None,
) -> TrainResult:
    """Train one LoRA adapter and save it to ``out_dir`` (see the module docstring).

    ``encode(tokenizer)`` returns the training examples and extra fields for the train log (inserted after
    ``mean_len``); it is called only when training actually happens. ``fingerprint`` identifies the training data
    (a finished adapter in ``out_dir`` is reused only when its config and fingerprint match); ``n_samples`` is the
    number of examples ``encode`` will return (0 is an error). ``cache_prefix`` (with ``cfg.layers`` set): compute
    the hidden states below the lowest adapted layer once and train on the layers above only (:func:`prefix_states`;
    recorded in the train log as ``prefix_cached_below_layer``). ``prefix_memo``: a dict kept by the caller across
    modules trained on the same base model, so that a sample shared by several modules is run through the lower
    layers once (see :func:`prefix_states`). ``label`` names the adapter on the progress bar (default: the output
    folder's name).
    """
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    base_model_dir, out_dir = Path(base_model_dir), Path(out_dir)
    log = _read_log(out_dir)
    if log is not None:
        _check_resume(out_dir, log, cfg, fingerprint)
        return TrainResult.from_log(out_dir, log, resumed=True)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OutputError(f"{out_dir} exists and is not a finished adapter directory; remove it first")
    if not n_samples:
        raise ParameterError(f"no training samples for {out_dir}")

    accelerator = _make_accelerator(cfg)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(base_model_dir)
    encoded, log_fields = encode(tokenizer)
    lengths = [len(e.input_ids) for e in encoded]

    model = _build_model(base_model_dir, cfg)
    trainable = count_parameters(model, trainable_only=True)
    first_layer = min(cfg.layers) if cache_prefix and cfg.layers else 0
    if cache_prefix and cfg.gradient_checkpointing:
        raise ParameterError("cache_prefix and gradient_checkpointing cannot be combined")
    t_prefix = time.perf_counter()
    states = prefix_states(model, encoded, first_layer, tokenizer.pad_token_id, memo=prefix_memo) if first_layer else None
    if first_layer:  # prefix_seconds: computing the states this module did not find in the memo (not in "seconds")
        log_fields = {**log_fields, "prefix_cached_below_layer": first_layer,
                      "prefix_seconds": round(time.perf_counter() - t_prefix, 3)}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    world, rank = accelerator.num_processes, accelerator.process_index

    plan0 = epoch_batches(lengths, cfg.batch_size, cfg.seed, 0, world)[rank::world]
    steps_per_epoch = math.ceil(len(plan0) / cfg.grad_accum)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    pad_id = tokenizer.pad_token_id
    losses: list[float] = []
    lrs: list[float] = []
    step_seconds: list[float] = []
    seen = 0
    step = 0
    epoch = 0
    t0 = time.perf_counter()
    from rich.progress import TextColumn

    columns = (TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} samples/s"))
    with progress_bar(progress and accelerator.is_main_process, *columns) as bar:
        task = bar.add_task(bar_label("training", label or out_dir.name), total=total_steps, loss="-", rate="-") if bar else None
        while step < total_steps:
            plan = plan0 if epoch == 0 else epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch, world)[rank::world]
            for group in _step_groups(plan, cfg.grad_accum):
                if step >= total_steps:
                    break
                t_step = time.perf_counter()
                batches = [collate_left([encoded[i] for i in b], pad_id) for b in group]
                if states is not None:
                    batches = [_with_prefix(x, [states[i] for i in b], first_layer) for x, b in zip(batches, group)]
                nll_total, n_tokens = _accumulate_gradients(model, accelerator, batches)
                if cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                lrs.append(scheduler.get_last_lr()[0])
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step_loss = float(accelerator.reduce(nll_total, reduction="sum") / n_tokens)
                losses.append(step_loss)
                step_seconds.append(round(time.perf_counter() - t_step, 4))
                seen += sum(len(b) for b in group) * world
                step += 1
                if bar:
                    rate = seen / max(time.perf_counter() - t0, 1e-9)
                    bar.update(task, advance=1, loss=f"{step_loss:.4f}", rate=f"{rate:.1f}")
            epoch += 1
    seconds = time.perf_counter() - t0

    log = {
        "format": LOG_FORMAT,
        "config": cfg.to_json(),
        "data_fingerprint": fingerprint,
        "base_model": str(base_model_dir),
        "n_samples": len(encoded),
        "n_answer_tokens": int(sum(e.n_answer_tokens for e in encoded)),
        "max_len": int(max(lengths)),
        "mean_len": float(np.mean(lengths)),
        **log_fields,
        "steps": step,
        "total_steps": total_steps,
        "epochs_started": epoch,
        "losses": losses,
        "learning_rates": lrs,
        "step_seconds": step_seconds,
        "seconds": round(seconds, 3),
        "samples_per_second": seen / max(seconds, 1e-9),
        "trainable_parameters": trainable,
        "world_size": world,
        "device": str(accelerator.device),
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
    }
    _save_adapter(accelerator, model, out_dir, log)
    accelerator.free_memory()
    return TrainResult.from_log(out_dir, log, resumed=False)


__all__ = [
    "ALL_PROJECTIONS",
    "IGNORE_INDEX",
    "EncodedExample",
    "LoraTrainConfig",
    "TrainResult",
    "collate_left",
    "epoch_batches",
    "train_lora_encoded",
]
