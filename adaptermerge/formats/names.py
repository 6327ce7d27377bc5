"""Module naming: the canonical names of the format layer, and the tables that resolve kohya's underscore names.

Canonical module names (what the engine merges by):

* PEFT adapters keep their key prefix, ``base_model.model.<module path>`` (a single model).
* Pipelines of several models (Stable Diffusion, SDXL, Flux) use diffusers' naming: ``<component>.<module path>``
  with component ``unet``, ``transformer``, ``text_encoder`` or ``text_encoder_2`` and the module path of the
  diffusers / transformers model (``unet.down_blocks.0.attentions.0.proj_in``).

kohya writes ``lora_unet_down_blocks_0_attentions_0_proj_in``: the dots became underscores, and so did the
underscores inside names (``proj_in``, ``to_q``), so the name alone is ambiguous. It is resolved against a list of
real module paths: a table of the known architectures below, the base model given with ``--base``, or the mapping an
adaptermerge-written file carries in its metadata.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import InputError

PEFT_PREFIX = "base_model.model."
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {  # kohya prefix -> diffusers component (unet is replaced by transformer for Flux)
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}


def split_component(name: str) -> tuple[str | None, str]:
    """(component or None, module path) of a canonical module name."""
    if name.startswith(PEFT_PREFIX):
        return None, name[len(PEFT_PREFIX):]
    head, _, rest = name.partition(".")
    if head in COMPONENTS and rest:
        return head, rest
    return None, name


def underscored(path: str) -> str:
    return path.replace(".", "_")


# ------------------------------------------------------------------------------------------------ tables
def _clip_paths(layers: int = 32) -> list[str]:
    out = []
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}"
        out += [f"{p}.self_attn.{x}_proj" for x in ("q", "k", "v", "out")]
        out += [f"{p}.mlp.fc1", f"{p}.mlp.fc2"]
    return out + ["text_projection"]


def _attention_block(p: str, depth: int) -> list[str]:
    out = [f"{p}.proj_in", f"{p}.proj_out"]
    for t in range(depth):
        tb = f"{p}.transformer_blocks.{t}"
        for att in ("attn1", "attn2"):
            out += [f"{tb}.{att}.to_q", f"{tb}.{att}.to_k", f"{tb}.{att}.to_v", f"{tb}.{att}.to_out.0"]
        out += [f"{tb}.ff.net.0.proj", f"{tb}.ff.net.2"]
    return out


def _resnet(p: str) -> list[str]:
    return [f"{p}.conv1", f"{p}.conv2", f"{p}.time_emb_proj", f"{p}.conv_shortcut"]


def _unet_paths() -> list[str]:
    """Every Linear/Conv module path of diffusers' UNet2DConditionModel as configured for SD 1.x/2.x (4 levels,
    1 transformer block per attention) and SDXL (3 levels, up to 10 transformer blocks): a superset of both."""
    out = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2",
           "add_embedding.linear_1", "add_embedding.linear_2"]
    for i in range(4):
        for j in range(2):
            out += _resnet(f"down_blocks.{i}.resnets.{j}")
            out += _attention_block(f"down_blocks.{i}.attentions.{j}", 10)
        out.append(f"down_blocks.{i}.downsamplers.0.conv")
        for j in range(3):
            out += _resnet(f"up_blocks.{i}.resnets.{j}")
            out += _attention_block(f"up_blocks.{i}.attentions.{j}", 10)
        out.append(f"up_blocks.{i}.upsamplers.0.conv")
    for j in range(2):
        out += _resnet(f"mid_block.resnets.{j}")
    out += _attention_block("mid_block.attentions.0", 10)
    return out


@dataclass(frozen=True)
class FluxTarget:
    """One kohya (BFL-named) Flux module and the diffusers modules its output rows split into."""

    parts: tuple[str, ...]  # diffusers module paths, in row order
    ratios: tuple[int, ...]  # row counts in units of rows/sum(ratios)
    swap_halves: bool = False  # final adaLN: BFL (shift, scale) rows vs diffusers (scale, shift)


def _flux_table(double: int = 19, single: int = 38) -> dict[str, FluxTarget]:
    t: dict[str, FluxTarget] = {}
    for i in range(double):
        b, d = f"double_blocks_{i}", f"transformer_blocks.{i}"
        t[f"{b}_img_attn_qkv"] = FluxTarget((f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"), (1, 1, 1))
        t[f"{b}_txt_attn_qkv"] = FluxTarget((f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"), (1, 1, 1))
        for k, v in (("img_attn_proj", "attn.to_out.0"), ("txt_attn_proj", "attn.to_add_out"),
                     ("img_mlp_0", "ff.net.0.proj"), ("img_mlp_2", "ff.net.2"),
                     ("txt_mlp_0", "ff_context.net.0.proj"), ("txt_mlp_2", "ff_context.net.2"),
                     ("img_mod_lin", "norm1.linear"), ("txt_mod_lin", "norm1_context.linear")):
            t[f"{b}_{k}"] = FluxTarget((f"{d}.{v}",), (1,))
    for i in range(single):
        b, d = f"single_blocks_{i}", f"single_transformer_blocks.{i}"
        # linear1 = [q; k; v; mlp] with mlp = 4 x hidden: rows 3h + 4h = 7 units of h
        t[f"{b}_linear1"] = FluxTarget((f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"), (1, 1, 1, 4))
        t[f"{b}_linear2"] = FluxTarget((f"{d}.proj_out",), (1,))
        t[f"{b}_modulation_lin"] = FluxTarget((f"{d}.norm.linear",), (1,))
    for k, v in (("img_in", "x_embedder"), ("txt_in", "context_embedder"),
                 ("time_in_in_layer", "time_text_embed.timestep_embedder.linear_1"),
                 ("time_in_out_layer", "time_text_embed.timestep_embedder.linear_2"),
                 ("vector_in_in_layer", "time_text_embed.text_embedder.linear_1"),
                 ("vector_in_out_layer", "time_text_embed.text_embedder.linear_2"),
                 ("guidance_in_in_layer", "time_text_embed.guidance_embedder.linear_1"),
                 ("guidance_in_out_layer", "time_text_embed.guidance_embedder.linear_2"),
                 ("final_layer_linear", "proj_out")):
        t[k] = FluxTarget((v,), (1,))
    t["final_layer_adaLN_modulation_1"] = FluxTarget(("norm_out.linear",), (1,), swap_halves=True)
    return t


FLUX = _flux_table()
UNET = {underscored(p): p for p in _unet_paths()}
CLIP = {underscored(p): p for p in _clip_paths()}


# Stable Diffusion's original (LDM / SGM) UNet names, as A1111-era trainers write them: layers_per_block = 2 for
# SD 1.x/2.x and SDXL, so input block n >= 1 is down level (n-1)//3, slot (n-1)%3 (slot 2: the downsampler), and
# output block n is up level n//3, resnet n%3.
_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj", "skip_connection": "conv_shortcut"}
_ATTN_INNER = {underscored(p[len("x."):]): p[len("x."):] for p in _attention_block("x", 10)}
_LDM_FIXED = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding.linear_1",
              "time_embed_2": "time_embedding.linear_2", "label_emb_0_0": "add_embedding.linear_1",
              "label_emb_0_2": "add_embedding.linear_2"}
_LDM_RE = re.compile(r"^(?P<kind>input_blocks|middle_block|output_blocks)_(?P<n>\d+)_(?P<slot>\d+)_(?P<rest>.+)$")


def ldm_unet_path(name: str) -> str | None:
    """The diffusers module path of an LDM-named UNet module (underscored, without ``lora_unet_``), or None."""
    if name in _LDM_FIXED:
        return _LDM_FIXED[name]
    mid = re.match(r"^middle_block_(?P<n>[012])_(?P<rest>.+)$", name)
    if mid is not None:
        n, rest = int(mid.group("n")), mid.group("rest")
        inner = _ATTN_INNER.get(rest) if n == 1 else _RESNET.get(rest)
        return f"mid_block.{'attentions.0' if n == 1 else f'resnets.{n // 2}'}.{inner}" if inner is not None else None
    m = _LDM_RE.match(name)
    if m is None:
        return None
    kind, n, slot, rest = m.group("kind"), int(m.group("n")), int(m.group("slot")), m.group("rest")
    if kind == "input_blocks":
        if n == 0:
            return None
        level, j = (n - 1) // 3, (n - 1) % 3
        if j == 2:
            return f"down_blocks.{level}.downsamplers.0.conv" if slot == 0 and rest == "op" else None
        prefix = f"down_blocks.{level}.{'resnets' if slot == 0 else 'attentions'}.{j}"
    elif kind == "middle_block":
        return None
    else:
        level, j = n // 3, n % 3
        if rest == "conv" and slot in (1, 2):
            return f"up_blocks.{level}.upsamplers.0.conv"
        prefix = f"up_blocks.{level}.{'resnets' if slot == 0 else 'attentions'}.{j}"
    inner = _RESNET.get(rest) if slot == 0 else _ATTN_INNER.get(rest)
    return f"{prefix}.{inner}" if inner is not None else None


def is_flux(kohya_unet_names: Iterable[str]) -> bool:
    return any(n.startswith(("double_blocks_", "single_blocks_")) for n in kohya_unet_names)


# ------------------------------------------------------------------------------------------------ --base
def base_module_paths(base: Path) -> dict[str | None, set[str]]:
    """Module paths of a base model, by component: from a safetensors file's header, a ``*.index.json`` weight
    map, a model folder holding either, or a diffusers pipeline folder (``unet/``, ``transformer/``,
    ``text_encoder/``, ``text_encoder_2/``). Only names are read, never tensor data."""
    from ..safetensors_io import read_header

    def names_in(folder_or_file: Path) -> set[str]:
        p = folder_or_file
        keys: set[str] = set()
        if p.is_file():
            if p.name.endswith(".json"):
                try:
                    keys = set(json.loads(p.read_text(encoding="utf-8"))["weight_map"])
                except (OSError, ValueError, KeyError, TypeError):
                    raise InputError(f"{p}: --base index is not a safetensors index (no weight_map)") from None
            else:
                keys = set(read_header(p).tensors)
        elif p.is_dir():
            for f in sorted(p.glob("*.safetensors.index.json")) or sorted(p.glob("*.safetensors")):
                keys |= names_in(f)
        return keys

    if not base.exists():
        raise InputError(f"{base}: --base does not exist")
    if base.is_dir() and any((base / c).is_dir() for c in COMPONENTS):
        out = {c: names_in(base / c) for c in COMPONENTS if (base / c).is_dir()}
    else:
        out = {None: names_in(base)}
    out = {c: {k[: -len(".weight")] for k in v if k.endswith(".weight")} for c, v in out.items()}
    if not any(out.values()):
        raise InputError(f"{base}: --base holds no safetensors weights (or index) to take module names from")
    return out


def base_heads(base: Path | None) -> tuple[int, int] | None:
    """(num_attention_heads, num_key_value_heads) from a base model's config.json, or None."""
    if base is None:
        return None
    cfg = base / "config.json" if base.is_dir() else base.parent / "config.json"
    try:
        c = json.loads(cfg.read_text(encoding="utf-8"))
        n = int(c["num_attention_heads"])
        return n, int(c.get("num_key_value_heads") or n)
    except (OSError, ValueError, KeyError, TypeError):
        return None
