"""The format layer: kohya / LyCORIS / diffusers / GGUF / conv LoRAs read into exact deltas, written back so that
their readers apply exactly the same delta, detection and coverage reported, bad files refused with one line.

Fixtures are written here from the formats' public key layouts; expected deltas are computed densely in the tests
(``scale * up @ down``, the LoHa Hadamard product, the LoKr Kronecker product), never by adaptermerge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import adaptermerge.formats as F
from adaptermerge.cli import main
from adaptermerge.errors import IncompatibleInputsError, InputError, ParameterError
from conftest import read_deltas, write_adapter

UNET_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
UNET_FF = "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"
UNET_CONV = "down_blocks.0.resnets.0.conv1"
UNET_SHORT = "down_blocks.1.resnets.0.conv_shortcut"
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"


def k(path: str, prefix: str = "lora_unet_") -> str:
    return prefix + path.replace(".", "_")


def rand(*shape, g):
    return torch.randn(*shape, generator=g)


def kohya_file(path: Path, seed: int = 0, *, alpha: float | None = 2.0, extra: dict | None = None) -> dict[str, torch.Tensor]:
    """An SD-style kohya LoRA: linear modules with and without alpha, a 3x3 conv, a 1x1 conv, a text-encoder module.
    Returns the expected dense deltas by canonical module name."""
    g = torch.Generator().manual_seed(seed)
    t, want = {}, {}
    specs = [(UNET_Q, (32, 32), None, alpha), (UNET_FF, (64, 16), None, None), (UNET_CONV, (16, 8), (3, 3), 8.0),
             (UNET_SHORT, (16, 8), (1, 1), 4.0)]
    for path_, (out, inp), kern, al in specs:
        r = 4
        key = k(path_)
        if kern is None:
            down, up = rand(r, inp, g=g), rand(out, r, g=g)
            d = up @ down
        else:
            down, up = rand(r, inp, *kern, g=g), rand(out, r, 1, 1, g=g)
            d = torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down).reshape(out, -1)
        t[f"{key}.lora_down.weight"], t[f"{key}.lora_up.weight"] = down, up
        if al is not None:
            t[f"{key}.alpha"] = torch.tensor(al)
        want[f"unet.{path_}"] = d * ((al if al is not None else r) / r)
    down, up = rand(2, 24, g=g), rand(24, 2, g=g)
    t[f"{k(TE_Q, 'lora_te_')}.lora_down.weight"], t[f"{k(TE_Q, 'lora_te_')}.lora_up.weight"] = down, up
    t[f"{k(TE_Q, 'lora_te_')}.alpha"] = torch.tensor(1.0)
    want[f"text_encoder.{TE_Q}"] = 0.5 * up @ down
    t.update(extra or {})
    save_file(t, str(path), metadata={"ss_network_dim": "4", "ss_network_alpha": "2"})
    return want


def deltas_of(path, **kw) -> dict[str, torch.Tensor]:
    a = F.load(path, **kw)
    return {n: a.delta(n) for n in a.modules}


def assert_deltas(got: dict, want: dict, *, exact: bool = False):
    assert sorted(got) == sorted(want)
    for n in want:
        if exact:
            assert torch.equal(got[n].float(), want[n].float()), n
        else:
            torch.testing.assert_close(got[n].double(), want[n].double(), rtol=1e-5, atol=1e-5, msg=n)


def no_temps(folder: Path) -> bool:
    return not any(p.name.startswith(".adaptermerge-tmp-") for p in folder.iterdir())


# ------------------------------------------------------------------------------------------------ detection + reading
def test_kohya_read_exact_with_conv_and_missing_alpha(tmp_path):
    f = tmp_path / "k.safetensors"
    want = kohya_file(f)
    fmt, why = F.detect(f)
    assert fmt == "kohya" and "lora_" in why
    a = F.load(f)
    assert a.layout == {f"unet.{UNET_CONV}": (3, 3), f"unet.{UNET_SHORT}": (1, 1)}
    assert a.modules[f"unet.{UNET_Q}"].scale == 0.5 and a.modules[f"unet.{UNET_FF}"].scale == 1.0
    assert a.coverage.recognised == 14 and a.coverage.unrecognised == []
    assert "architecture table SD1.x/SDXL UNet (4)" in a.coverage.mapping and "CLIP" in a.coverage.mapping
    assert any("without an alpha" in n for n in a.notes)
    assert_deltas({n: a.delta(n) for n in a.modules}, want)


def test_diffusers_new_and_legacy_forms(tmp_path):
    g = torch.Generator().manual_seed(3)
    t, want = {}, {}
    down, up = rand(4, 32, g=g), rand(32, 4, g=g)
    t[f"unet.{UNET_Q}.lora_A.weight"], t[f"unet.{UNET_Q}.lora_B.weight"], t[f"unet.{UNET_Q}.alpha"] = down, up, torch.tensor(8.0)
    want[f"unet.{UNET_Q}"] = 2 * up @ down
    down, up = rand(2, 64, g=g), rand(16, 2, g=g)  # legacy LoRACompatibleLinear form, no alpha
    t[f"unet.{UNET_FF}.lora.down.weight"], t[f"unet.{UNET_FF}.lora.up.weight"] = down, up
    want[f"unet.{UNET_FF}"] = up @ down
    down, up = rand(3, 24, g=g), rand(24, 3, g=g)  # legacy text-encoder monkey patch
    t[f"text_encoder.{TE_Q}.lora_linear_layer.down.weight"], t[f"text_encoder.{TE_Q}.lora_linear_layer.up.weight"] = down, up
    want[f"text_encoder.{TE_Q}"] = up @ down
    base = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2"  # oldest attention-processor form
    down, up = rand(2, 32, g=g), rand(32, 2, g=g)
    t[f"{base}.processor.to_out_lora.down.weight"], t[f"{base}.processor.to_out_lora.up.weight"] = down, up
    want[f"{base}.to_out.0"] = up @ down
    save_file(t, str(tmp_path / "d.safetensors"))
    assert F.detect(tmp_path / "d.safetensors")[0] == "diffusers"
    assert_deltas(deltas_of(tmp_path / "d.safetensors"), want)


def test_tucker_conv_lora_mid(tmp_path):
    g = torch.Generator().manual_seed(4)
    key = k(UNET_CONV)
    down, mid, up = rand(4, 8, 1, 1, g=g), rand(4, 4, 3, 3, g=g), rand(16, 4, 1, 1, g=g)
    save_file({f"{key}.lora_down.weight": down, f"{key}.lora_mid.weight": mid, f"{key}.lora_up.weight": up,
               f"{key}.alpha": torch.tensor(1.0)}, str(tmp_path / "t.safetensors"))
    want = torch.einsum("oa,abhw,bi->oihw", up[:, :, 0, 0], mid, down[:, :, 0, 0]) * 0.25
    got = F.load(tmp_path / "t.safetensors")
    torch.testing.assert_close(got.delta(f"unet.{UNET_CONV}"), want.reshape(16, -1), rtol=1e-5, atol=1e-5)
    assert got.layout[f"unet.{UNET_CONV}"] == (3, 3)


def test_loha_and_lokr_exact_low_rank(tmp_path):
    g = torch.Generator().manual_seed(5)
    t = {}
    w1a, w1b, w2a, w2b = rand(32, 3, g=g), rand(3, 32, g=g), rand(32, 3, g=g), rand(3, 32, g=g)
    lq = k(UNET_Q)
    t.update({f"{lq}.hada_w1_a": w1a, f"{lq}.hada_w1_b": w1b, f"{lq}.hada_w2_a": w2a, f"{lq}.hada_w2_b": w2b, f"{lq}.alpha": torch.tensor(6.0)})
    # LoKr: full w1 (4x2), low-rank w2 (16x32 as 16x2 @ 2x32): delta (64, 64)
    w1, a2, b2 = rand(4, 2, g=g), rand(16, 2, g=g), rand(2, 32, g=g)
    lf = k(UNET_FF)
    t.update({f"{lf}.lokr_w1": w1, f"{lf}.lokr_w2_a": a2, f"{lf}.lokr_w2_b": b2, f"{lf}.alpha": torch.tensor(1.0)})
    save_file(t, str(tmp_path / "l.safetensors"))
    assert F.detect(tmp_path / "l.safetensors")[0] == "lycoris"
    a = F.load(tmp_path / "l.safetensors")
    assert a.modules[f"unet.{UNET_Q}"].rank == 9 and a.coverage.kinds == {"loha": 1, "lokr": 1}
    want_q = (w1a @ w1b) * (w2a @ w2b) * 2.0
    want_f = torch.kron(w1, a2 @ b2) * 0.5
    torch.testing.assert_close(a.delta(f"unet.{UNET_Q}"), want_q, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(a.delta(f"unet.{UNET_FF}"), want_f, rtol=1e-5, atol=1e-5)


def test_lycoris_library_forward_equals_base_plus_our_delta(tmp_path):
    """LoHa/LoKr modules made by lycoris-lora itself (linear and conv): the library's forward pass equals the base
    layer plus the delta adaptermerge reads from the saved weights."""
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    torch.manual_seed(0)
    cases = [
        (UNET_Q, torch.nn.Linear(32, 32, bias=False), LohaModule, dict(lora_dim=3, alpha=6)),
        (UNET_CONV, torch.nn.Conv2d(8, 16, 3, padding=1, bias=False), LohaModule, dict(lora_dim=2, alpha=1)),
        (UNET_FF, torch.nn.Linear(16, 64, bias=False), LokrModule, dict(lora_dim=2, alpha=1, factor=4)),
        ("down_blocks.0.resnets.0.conv2", torch.nn.Conv2d(16, 16, 3, padding=1, bias=False), LokrModule, dict(lora_dim=2, alpha=2, factor=4, decompose_both=True)),
    ]
    tensors, layers = {}, {}
    for path_, layer, cls, kw in cases:
        mod = cls(k(path_), layer, multiplier=1.0, **kw)
        for p in mod.parameters():
            if p.requires_grad and p.dim() >= 2:
                torch.nn.init.normal_(p, std=0.5)
        mod.apply_to()
        for name, v in mod.state_dict().items():
            tensors[f"{k(path_)}.{name}"] = v.detach().clone().contiguous()
        layers[path_] = (layer, mod)
    save_file(tensors, str(tmp_path / "lyco.safetensors"))
    a = F.load(tmp_path / "lyco.safetensors")
    for path_, (layer, mod) in layers.items():
        x = torch.randn(2, 32) if isinstance(layer, torch.nn.Linear) and layer.in_features == 32 else (
            torch.randn(2, 16) if isinstance(layer, torch.nn.Linear) else torch.randn(1, layer.in_channels, 6, 6))
        with torch.no_grad():
            got = layer(x)  # lycoris has replaced the forward
            w0 = mod.org_module[0].weight
            d = a.delta(f"unet.{path_}").reshape(w0.shape)
            if isinstance(layer, torch.nn.Linear):
                want, base = torch.nn.functional.linear(x, w0 + d), torch.nn.functional.linear(x, w0)
            else:
                want, base = torch.nn.functional.conv2d(x, w0 + d, padding=1), torch.nn.functional.conv2d(x, w0, padding=1)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert (got - base).abs().max() > 1e-2  # the module does something


# ------------------------------------------------------------------------------------------------ Flux
def test_flux_fused_modules_split_and_fuse_back(tmp_path):
    g = torch.Generator().manual_seed(6)
    h, r = 8, 2
    t, want = {}, {}
    a_qkv, b_qkv = rand(r, h, g=g), rand(3 * h, r, g=g)
    t["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], t["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = a_qkv, b_qkv
    t["lora_unet_double_blocks_0_img_attn_qkv.alpha"] = torch.tensor(1.0)
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        want[f"transformer.transformer_blocks.0.attn.{part}"] = 0.5 * b_qkv[i * h:(i + 1) * h] @ a_qkv
    a1, b1 = rand(r, h, g=g), rand(7 * h, r, g=g)
    t["lora_unet_single_blocks_3_linear1.lora_down.weight"], t["lora_unet_single_blocks_3_linear1.lora_up.weight"] = a1, b1
    for (part, lo, hi) in (("attn.to_q", 0, h), ("attn.to_k", h, 2 * h), ("attn.to_v", 2 * h, 3 * h), ("proj_mlp", 3 * h, 7 * h)):
        want[f"transformer.single_transformer_blocks.3.{part}"] = b1[lo:hi] @ a1
    af, bf = rand(r, h, g=g), rand(2 * h, r, g=g)
    t["lora_unet_final_layer_adaLN_modulation_1.lora_down.weight"], t["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"] = af, bf
    want["transformer.norm_out.linear"] = torch.cat([bf[h:], bf[:h]]) @ af  # BFL (shift, scale) -> diffusers (scale, shift)
    save_file(t, str(tmp_path / "flux.safetensors"))
    a = F.load(tmp_path / "flux.safetensors")
    assert "Flux" in a.coverage.mapping
    assert_deltas({n: a.delta(n) for n in a.modules}, want)
    F.save(a, tmp_path / "back.safetensors", to="kohya")
    with safe_open(str(tmp_path / "back.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in keys and "lora_unet_single_blocks_3_linear1.lora_up.weight" in keys
    assert_deltas(deltas_of(tmp_path / "back.safetensors"), want)
    F.save(a, tmp_path / "diff.safetensors", to="diffusers")
    assert_deltas(deltas_of(tmp_path / "diff.safetensors"), want)


# ------------------------------------------------------------------------------------------------ --base mapping
def test_base_index_resolves_underscore_names(tmp_path):
    g = torch.Generator().manual_seed(7)
    down, up = rand(2, 16, g=g), rand(16, 2, g=g)
    save_file({"lora_unet_my_block_0_weird_name_proj.lora_down.weight": down, "lora_unet_my_block_0_weird_name_proj.lora_up.weight": up},
              str(tmp_path / "x.safetensors"))
    with pytest.raises(InputError, match="no module could be named"):
        F.load(tmp_path / "x.safetensors")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "my_block.0.weird_name.proj.weight": "a.safetensors", "my_block.0.weird.name_proj.bias": "a.safetensors"}}))
    a = F.load(tmp_path / "x.safetensors", base=tmp_path / "base")
    assert list(a.modules) == ["base_model.model.my_block.0.weird_name.proj"]
    assert "--base" in a.coverage.mapping
    torch.testing.assert_close(a.delta("base_model.model.my_block.0.weird_name.proj"), up @ down)


def test_tables_are_unambiguous():
    from adaptermerge.formats import names as N

    for paths in (N._unet_paths(), N._clip_paths()):
        assert len({N.underscored(p) for p in set(paths)}) == len(set(paths))


# ------------------------------------------------------------------------------------------------ round trips
def test_peft_kohya_peft_and_peft_gguf_peft_exact(tmp_path):
    src = write_adapter(tmp_path / "p", r=4, alpha=8.0)  # scale 2: exact in floating point
    want = read_deltas(src)
    a = F.load(src)
    F.save(a, tmp_path / "k.safetensors", to="kohya")
    assert F.detect(tmp_path / "k.safetensors")[0] == "kohya"
    F.save(F.load(tmp_path / "k.safetensors"), tmp_path / "back_k", to="peft")
    assert_deltas(read_deltas(tmp_path / "back_k"), want, exact=True)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"num_attention_heads": 4, "num_key_value_heads": 2}))
    F.save(a, tmp_path / "a.gguf", to="gguf", base=tmp_path / "hf")
    assert F.detect(tmp_path / "a.gguf")[0] == "gguf"
    F.save(F.load(tmp_path / "a.gguf"), tmp_path / "back_g", to="peft")
    assert_deltas(read_deltas(tmp_path / "back_g"), want, exact=True)


def test_gguf_layout_alpha_and_llama_permutation(tmp_path):
    """The GGUF file itself, read with the gguf package: names, (r, in)/(out, r) shapes, alpha, and the q rows in
    llama.cpp's order (the HF rows permuted per head), so that llama.cpp applies exactly the PEFT delta."""
    import gguf

    src = write_adapter(tmp_path / "p", r=4, alpha=4.0, rank_pattern={"v_proj": 2})
    want = read_deltas(src)
    F.save(F.load(src), tmp_path / "a.gguf", to="gguf", heads=(4, 2))
    rd = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    fields = {k: v.contents() for k, v in rd.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora" and fields["general.architecture"] == "llama"
    alpha = fields["adapter.lora.alpha"]
    ts = {t.name: torch.from_numpy(t.data.copy()).double() for t in rd.tensors}
    for hf, gname in (("model.layers.0.self_attn.q_proj", "blk.0.attn_q"), ("model.layers.0.self_attn.v_proj", "blk.0.attn_v"),
                      ("model.layers.0.mlp.down_proj", "blk.0.ffn_down")):
        a, b = ts[f"{gname}.weight.lora_a"], ts[f"{gname}.weight.lora_b"]
        r = b.shape[1]
        applied = (alpha / r) * b @ a  # llama.cpp: scale = alpha / rank
        d = want[hf]
        if gname.endswith("attn_q"):  # llama.cpp's permute(w, n_head): rows (head, pair, half) -> (head, half, pair)
            d = d.reshape(4, 2, d.shape[0] // 8, -1).swapaxes(1, 2).reshape(d.shape)
        torch.testing.assert_close(applied, d, rtol=1e-6, atol=1e-6)


def test_gguf_q_k_without_heads_refused(tmp_path):
    src = write_adapter(tmp_path / "p")
    with pytest.raises(ParameterError, match="--base"):
        F.save(F.load(src), tmp_path / "a.gguf", to="gguf")
    assert not (tmp_path / "a.gguf").exists() and no_temps(tmp_path)


def test_vllm_profile_pads_to_an_accepted_rank(tmp_path):
    src = write_adapter(tmp_path / "p", r=4, alpha=8.0, rank_pattern={"v_proj": 2})
    want = read_deltas(src)
    assert main(["convert", str(src), "--for", "vllm", "-o", str(tmp_path / "v")]) == 0
    cfg = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8 and cfg["rank_pattern"] == {} and cfg["modules_to_save"] is None
    assert not cfg["use_dora"]
    assert_deltas(read_deltas(tmp_path / "v"), want)
    with safe_open(str(tmp_path / "v" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_slice(x).get_shape()[0] for x in f.keys() if "lora_A" in x} == {8}


# ------------------------------------------------------------------------------------------------ merging
def test_kohya_merge_stays_kohya_and_is_exact(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    wa, wb = kohya_file(a, 1), kohya_file(b, 2, alpha=4.0)
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(a), str(b), "--weights", "0.25,0.75", "--rank", "8", "-o", str(out), "-q"]) == 0
    assert F.detect(out)[0] == "kohya"
    got = deltas_of(out)
    assert F.load(out).layout == {f"unet.{UNET_CONV}": (3, 3), f"unet.{UNET_SHORT}": (1, 1)}
    assert_deltas(got, {n: 0.25 * wa[n] + 0.75 * wb[n] for n in wa})
    with safe_open(str(out), "pt") as f:
        assert list(f.get_slice(f"{k(UNET_CONV)}.lora_down.weight").get_shape()) == [8, 8, 3, 3]
        assert f.get_tensor(f"{k(UNET_CONV)}.alpha").item() == 8.0


def test_mixed_formats_map_to_one_naming(tmp_path):
    a = tmp_path / "a.safetensors"
    wa = kohya_file(a, 1)
    F.save(F.load(a), tmp_path / "d.safetensors", to="diffusers")
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(a), str(tmp_path / "d.safetensors"), "-o", str(out), "--method", "cat", "-q"]) == 0
    assert_deltas(deltas_of(out), {n: 2 * d for n, d in wa.items()})
    # a PEFT adapter of a language model and an SD LoRA: the first module that cannot be matched is named
    p = write_adapter(tmp_path / "p")
    with pytest.raises(IncompatibleInputsError, match="text_encoder.text_model.encoder.layers.0.self_attn.q_proj"):
        F.align([F.load(p), F.load(a)])


def test_peft_merge_output_bytes_unchanged(tmp_path):
    """PEFT in, PEFT out: the CLI still goes through the engine's own writer (byte-identical outputs)."""
    from adaptermerge.engine import merge_to

    a, b = write_adapter(tmp_path / "a", seed=1), write_adapter(tmp_path / "b", seed=2)
    assert main(["merge", str(a), str(b), "--method", "ties", "--density", "0.5", "-o", str(tmp_path / "cli"), "-q"]) == 0
    merge_to(tmp_path / "api", [a, b], "ties", density=0.5)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "api" / name).read_bytes()


# ------------------------------------------------------------------------------------------------ refusals
def _cli_fails(capsys, args, out: Path, code: int, match: str):
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert len(err.splitlines()) == 1 and match in err, err
    assert not out.exists() and no_temps(out.parent)


def test_nothing_recognised(tmp_path, capsys):
    save_file({"model.diffusion_model.input_blocks.0.weight": torch.zeros(2, 2)}, str(tmp_path / "x.safetensors"))
    _cli_fails(capsys, ["convert", str(tmp_path / "x.safetensors"), "--to", "peft", "-o", str(tmp_path / "o")], tmp_path / "o", 3, "no LoRA tensors recognised")


def test_half_recognised_refused_unless_ignore_unknown(tmp_path, capsys):
    f = tmp_path / "h.safetensors"
    want = kohya_file(f, extra={"lora_unet_down_blocks_0_attentions_0_proj_in.diff": torch.zeros(4, 4),
                                "lora_unet_no_such_block_0_to_q.lora_down.weight": torch.zeros(2, 4),
                                "lora_unet_no_such_block_0_to_q.lora_up.weight": torch.zeros(4, 2)})
    out = tmp_path / "o.safetensors"
    _cli_fails(capsys, ["convert", str(f), "--to", "kohya", "-o", str(out)], out, 3, "3 of 17 keys not recognised")
    assert main(["convert", str(f), "--to", "kohya", "-o", str(out), "--ignore-unknown"]) == 0
    assert "unrecognised keys ignored" in capsys.readouterr().err
    assert_deltas(deltas_of(out), want)
    a = F.load(f, ignore_unknown=True)
    assert a.coverage.unrecognised == sorted(["lora_unet_down_blocks_0_attentions_0_proj_in.diff",
                                              "lora_unet_no_such_block_0_to_q.lora_down.weight", "lora_unet_no_such_block_0_to_q.lora_up.weight"])


def test_wrong_shape_alpha(tmp_path, capsys):
    f = tmp_path / "a.safetensors"
    kohya_file(f, extra={f"{k(UNET_FF)}.alpha": torch.ones(4)})
    _cli_fails(capsys, ["convert", str(f), "--to", "peft", "-o", str(tmp_path / "o")], tmp_path / "o", 3, "alpha must be a scalar")


def test_unknown_conv_kernel_shape(tmp_path, capsys):
    key = k(UNET_CONV)
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 8, 3, 3), f"{key}.lora_up.weight": torch.zeros(16, 4, 3, 3)}, str(tmp_path / "c.safetensors"))
    out = tmp_path / "o.safetensors"
    _cli_fails(capsys, ["merge", str(tmp_path / "c.safetensors"), str(tmp_path / "c.safetensors"), "-o", str(out)], out, 3, "unknown LoRA/conv kernel shapes")


def test_dora_and_half_pairs_refused(tmp_path):
    key = k(UNET_Q)
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 32)}, str(tmp_path / "h.safetensors"))
    with pytest.raises(InputError, match="no up"):
        F.load(tmp_path / "h.safetensors")
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 32), f"{key}.lora_up.weight": torch.zeros(32, 4),
               f"{key}.dora_scale": torch.zeros(1, 32)}, str(tmp_path / "d.safetensors"))
    with pytest.raises(InputError, match="DoRA"):
        F.load(tmp_path / "d.safetensors")
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 32), f"{key}.lora_up.weight": torch.zeros(32, 4),
               f"{key}.hada_w1_a": torch.zeros(32, 2)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(InputError, match="mixes hada and lora"):
        F.load(tmp_path / "m.safetensors")


def test_inspect_reports_format_mapping_and_scales(tmp_path, capsys):
    f = tmp_path / "k.safetensors"
    kohya_file(f)
    assert main(["inspect", str(f), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"]["format"] == "kohya" and info["format"]["recognised_keys"] == 14
    scales = {r["module"]: r["scale"] for r in info["modules"]}
    assert scales[f"unet.{UNET_Q}"] == 0.5 and scales[f"text_encoder.{TE_Q}"] == 0.5 and scales[f"unet.{UNET_FF}"] == 1.0
    kern = {r["module"]: r["kernel"] for r in info["modules"]}
    assert kern[f"unet.{UNET_CONV}"] == [3, 3] and kern[f"unet.{UNET_Q}"] is None
    assert main(["inspect", str(f), "--format", "peft"]) == 3  # forced: the PEFT reader finds no PEFT keys
    assert "no LoRA tensors found" in capsys.readouterr().err


def test_format_options_validated_before_reading(tmp_path, capsys):
    f = tmp_path / "k.safetensors"
    kohya_file(f)
    assert main(["convert", str(f), "--to", "onnx", "-o", str(tmp_path / "o")]) == 2
    assert "--to must be one of" in capsys.readouterr().err
    assert main(["merge", str(f), str(f), "--for", "tgi", "-o", str(tmp_path / "o")]) == 2
    assert "--for must be one of" in capsys.readouterr().err


def test_peft_conv_adapter_read_and_round_trip(tmp_path):
    """A PEFT adapter with a conv module (4-D factors), made by PEFT: our delta equals PEFT's get_delta_weight, and
    PEFT -> kohya -> PEFT keeps it."""
    import peft

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 6, 3)
            self.lin = torch.nn.Linear(6, 5)

    torch.manual_seed(0)
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=2, lora_alpha=6, target_modules=["conv", "lin"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path / "p"))
    want = {f"base_model.model.{n}": getattr(model.base_model.model, n).get_delta_weight("default").detach() for n in ("conv", "lin")}
    a = F.load(tmp_path / "p")
    assert a.layout == {"base_model.model.conv": (3, 3)}
    assert a.modules["base_model.model.conv"].scale == 3.0
    for n, d in want.items():
        torch.testing.assert_close(a.delta(n), d.reshape(d.shape[0], -1), rtol=1e-5, atol=1e-6)
    F.save(a, tmp_path / "k.safetensors", to="kohya")
    F.save(F.load(tmp_path / "k.safetensors"), tmp_path / "back", to="peft")
    b = F.load(tmp_path / "back")
    for n, d in want.items():
        torch.testing.assert_close(b.delta(n), d.reshape(d.shape[0], -1), rtol=1e-5, atol=1e-6)
    with safe_open(str(tmp_path / "back" / "adapter_model.safetensors"), "pt") as f:
        assert list(f.get_slice("base_model.model.conv.lora_A.weight").get_shape()) == [2, 4, 3, 3]


def test_vllm_profile_truncates_above_512_and_reports(tmp_path, capsys):
    g = torch.Generator().manual_seed(8)
    a, b = rand(520, 600, g=g), rand(600, 520, g=g)
    save_file({"base_model.model.big.lora_A.weight": a, "base_model.model.big.lora_B.weight": b}, str(tmp_path / "big.safetensors"),
              metadata={"lora_alpha": "520"})
    assert main(["convert", str(tmp_path / "big.safetensors"), "--for", "vllm", "-o", str(tmp_path / "v"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    err = rep["output"]["profile"]["truncation_errors"]["base_model.model.big"]
    s = torch.linalg.svdvals((b.double() @ a.double()))
    assert err == pytest.approx(float(s[512:].norm() / s.norm()), rel=1e-4)
    cfg = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert cfg["r"] == 512 and cfg["rank_pattern"] == {}


def test_llama_cpp_profile_writes_gguf(tmp_path):
    src = write_adapter(tmp_path / "p", r=4, alpha=8.0)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"num_attention_heads": 4, "num_key_value_heads": 2}))
    assert main(["convert", str(src), "--for", "llama.cpp", "-o", str(tmp_path / "out.gguf"), "--base", str(tmp_path / "hf")]) == 0
    assert F.detect(tmp_path / "out.gguf")[0] == "gguf"
    assert_deltas(deltas_of(tmp_path / "out.gguf"), {f"base_model.model.{n}": d.float() for n, d in read_deltas(src).items()})


def test_format_layer_imports_stay_light():
    """The format layer imports neither the optional gguf package nor the libraries the tests check against."""
    import subprocess
    import sys

    code = ("import sys, adaptermerge.formats, adaptermerge.formats_cli, adaptermerge.cli\n"
            "print(','.join(sorted(m for m in ('gguf', 'diffusers', 'lycoris', 'transformers', 'peft') if m in sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_non_lora_tensors_refused_outside_peft(tmp_path, capsys):
    src = write_adapter(tmp_path / "p", extra={"base_model.model.lm_head.modules_to_save.default.weight": torch.zeros(3, 16)})
    for to, out in (("kohya", tmp_path / "o.safetensors"), ("gguf", tmp_path / "o.gguf")):
        _cli_fails(capsys, ["convert", str(src), "--to", to, "-o", str(out)], out, 2, "modules_to_save")


def test_pipeline_lora_to_peft_is_a_folder_per_component(tmp_path):
    """An SD LoRA (UNet + text encoder) as PEFT: one adapter per component, in diffusers' sub-folder names; PEFT
    loads each on its own model, and it reads back (and converts back to kohya) with the same deltas."""
    f = tmp_path / "k.safetensors"
    want = kohya_file(f)
    assert main(["convert", str(f), "--to", "peft", "-o", str(tmp_path / "p")]) == 0
    assert sorted(x.name for x in (tmp_path / "p").iterdir()) == ["text_encoder", "unet"]
    te = read_deltas(tmp_path / "p" / "text_encoder")
    torch.testing.assert_close(te[TE_Q].float(), want[f"text_encoder.{TE_Q}"], rtol=1e-5, atol=1e-5)
    assert F.detect(tmp_path / "p")[0] == "peft"
    assert_deltas(deltas_of(tmp_path / "p"), want)
    assert main(["convert", str(tmp_path / "p"), "-o", str(tmp_path / "back.safetensors"), "--to", "kohya"]) == 0
    assert_deltas(deltas_of(tmp_path / "back.safetensors"), want)
    assert F.load(tmp_path / "back.safetensors").layout == {f"unet.{UNET_CONV}": (3, 3), f"unet.{UNET_SHORT}": (1, 1)}
    assert main(["convert", str(f), "--to", "peft", "-o", str(tmp_path / "p"), "--force"]) == 0  # replaces its own kind
    assert main(["convert", str(tmp_path / "p"), "--to", "peft", "-o", str(tmp_path / "p"), "--force"]) == 2  # never its input
    assert_deltas(deltas_of(tmp_path / "p"), want)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    assert main(["convert", str(f), "--to", "peft", "-o", str(tmp_path / "other"), "--force"]) == 5
    assert (tmp_path / "other" / "notes.txt").exists()


def test_gpt2_style_bare_peft_file_is_not_taken_for_diffusers(tmp_path):
    g = torch.Generator().manual_seed(9)
    save_file({"transformer.h.0.attn.c_attn.lora_A.weight": rand(2, 8, g=g), "transformer.h.0.attn.c_attn.lora_B.weight": rand(24, 2, g=g)},
              str(tmp_path / "gpt2.safetensors"))
    assert F.detect(tmp_path / "gpt2.safetensors")[0] == "peft"
    with pytest.raises(ParameterError, match="no lora_alpha"):  # as before: a bare PEFT file needs its alpha
        F.load(tmp_path / "gpt2.safetensors")


def test_outputs_are_byte_reproducible(tmp_path):
    f = tmp_path / "k.safetensors"
    kohya_file(f)
    src = write_adapter(tmp_path / "p")
    for i in (1, 2):
        assert main(["merge", str(f), str(f), "--method", "dare_ties", "--density", "0.5", "--seed", "3", "-o", str(tmp_path / f"m{i}.safetensors"), "-q"]) == 0
        assert main(["convert", str(src), "--to", "gguf", "--gguf-arch", "qwen2", "-o", str(tmp_path / f"g{i}.gguf")]) == 0
    assert (tmp_path / "m1.safetensors").read_bytes() == (tmp_path / "m2.safetensors").read_bytes()
    assert (tmp_path / "g1.gguf").read_bytes() == (tmp_path / "g2.gguf").read_bytes()
    assert_deltas(deltas_of(tmp_path / "g1.gguf"), {f"base_model.model.{n}": d.float() for n, d in read_deltas(src).items()})


def test_loha_rank_capped_at_full_rank_exactly(tmp_path):
    g = torch.Generator().manual_seed(10)
    w1a, w1b, w2a, w2b = rand(6, 4, g=g), rand(4, 10, g=g), rand(6, 4, g=g), rand(4, 10, g=g)  # r^2 = 16 > min(6, 10)
    key = k(UNET_Q)
    save_file({f"{key}.hada_w1_a": w1a, f"{key}.hada_w1_b": w1b, f"{key}.hada_w2_a": w2a, f"{key}.hada_w2_b": w2b},
              str(tmp_path / "l.safetensors"))
    a = F.load(tmp_path / "l.safetensors")
    m = a.modules[f"unet.{UNET_Q}"]
    b_, a_ = a.factors(m.name)
    assert m.rank == 6 and a_.shape[0] == 6 and b_.shape == (6, 6)
    torch.testing.assert_close(a.delta(m.name), (w1a @ w1b) * (w2a @ w2b), rtol=1e-5, atol=1e-5)


def test_outputs_get_ordinary_permissions(tmp_path):
    from adaptermerge.safetensors_io import current_umask

    f = tmp_path / "k.safetensors"
    kohya_file(f)
    src = write_adapter(tmp_path / "p")
    assert main(["convert", str(f), "--to", "peft", "-o", str(tmp_path / "pipe")]) == 0
    assert main(["convert", str(src), "--to", "gguf", "--gguf-arch", "qwen2", "-o", str(tmp_path / "a.gguf")]) == 0
    assert main(["convert", str(f), "--to", "kohya", "-o", str(tmp_path / "k2.safetensors")]) == 0
    um = current_umask()
    assert (tmp_path / "pipe").stat().st_mode & 0o777 == 0o777 & ~um
    for out in (tmp_path / "a.gguf", tmp_path / "k2.safetensors"):
        assert out.stat().st_mode & 0o777 == 0o666 & ~um, out


def test_merge_config_takes_the_format_options(tmp_path, capsys):
    """--to, --for, --format, --base, --ignore-unknown and --gguf-arch as config keys: paths relative to the config,
    command-line flags win, and wrong types are one-line errors before anything is read."""
    junk = {"lora_unet_no_such_block_0_to_q.lora_down.weight": torch.zeros(2, 4),
            "lora_unet_no_such_block_0_to_q.lora_up.weight": torch.zeros(4, 2)}
    wa = kohya_file(tmp_path / "a.safetensors", seed=1, extra=junk)
    wb = kohya_file(tmp_path / "b.safetensors", seed=2)
    want = {n: wa[n] + wb[n] for n in wa}
    cfg = tmp_path / "m.yaml"
    base = "inputs: [a.safetensors, b.safetensors]\nmethod: task_arithmetic\nrank: full\nformat: kohya\n"
    cfg.write_text(base + "output: out.safetensors\n")
    _cli_fails(capsys, ["merge", "--config", str(cfg), "-q"], tmp_path / "out.safetensors", 3, "not recognised")
    cfg.write_text(base + "output: out.safetensors\nto: kohya\nignore_unknown: true\n")
    assert main(["merge", "--config", str(cfg), "-q"]) == 0, capsys.readouterr().err
    assert F.detect(tmp_path / "out.safetensors")[0] == "kohya"
    assert_deltas(deltas_of(tmp_path / "out.safetensors"), want)
    # a flag overrides the config's value: a PEFT folder instead of kohya
    assert main(["merge", "--config", str(cfg), "-q", "--to", "peft", "-o", str(tmp_path / "peft_out")]) == 0
    assert sorted(x.name for x in (tmp_path / "peft_out").iterdir()) == ["text_encoder", "unet"]  # PEFT: one per component
    assert_deltas(deltas_of(tmp_path / "peft_out"), want)
    # GGUF: base (head counts) relative to the config's folder, and the architecture written as asked
    p = write_adapter(tmp_path / "p", r=4, alpha=8.0)
    (tmp_path / "sub" / "hf").mkdir(parents=True)
    (tmp_path / "sub" / "hf" / "config.json").write_text(json.dumps({"num_attention_heads": 4, "num_key_value_heads": 2}))
    g = tmp_path / "sub" / "g.yaml"
    g.write_text("inputs: [../p, ../p]\nmethod: task_arithmetic\nrank: full\noutput: out.gguf\nfor: llama.cpp\nbase: hf\ngguf_arch: qwen2\n")
    assert main(["merge", "--config", str(g), "-q"]) == 0, capsys.readouterr().err
    import gguf

    r = gguf.GGUFReader(str(tmp_path / "sub" / "out.gguf"))
    arch = r.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "qwen2"
    assert_deltas(deltas_of(tmp_path / "sub" / "out.gguf"), {f"base_model.model.{n}": 2 * d.float() for n, d in read_deltas(p).items()})
    # strict types and values, before any input is read
    cfg.write_text(base + "output: o2.safetensors\nignore_unknown: 'yes'\n")
    _cli_fails(capsys, ["merge", "--config", str(cfg), "-q"], tmp_path / "o2.safetensors", 2, "config ignore_unknown must be true or false")
    cfg.write_text(base + "output: o2.safetensors\nfor: tgi\n")
    _cli_fails(capsys, ["merge", "--config", str(cfg), "-q"], tmp_path / "o2.safetensors", 2, "--for must be one of")
