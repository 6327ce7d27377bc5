"""diffusers itself applies our kohya and diffusers outputs exactly as base + our delta, and its own kohya-Flux
converter splits the fused Flux modules exactly as our table does. (Test extra: diffusers; a missing install fails.)"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

import adaptermerge.formats as F

import diffusers  # noqa: E402  (test extra: a missing install must fail, not skip)
from diffusers.loaders import StableDiffusionLoraLoaderMixin


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
    ).eval()


PICK = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "down_blocks.0.attentions.0.proj_in", "down_blocks.0.resnets.0.conv1", "down_blocks.0.downsamplers.0.conv",
        "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj", "mid_block.resnets.0.time_emb_proj"]


def _dense_reference(unet, a, g):
    """Inputs drawn from ``g`` and the UNet's output with every delta of ``a`` added to its weights (independent of
    any loader), plus the base output."""
    x = torch.randn(1, 4, 8, 8, generator=g)
    tt, enc = torch.tensor([10]), torch.randn(1, 5, 32, generator=g)
    want_model = copy.deepcopy(unet)
    named = dict(want_model.named_modules())
    with torch.no_grad():
        for name in a.modules:
            w = named[name.split(".", 1)[1]].weight
            w += a.delta(name).reshape(w.shape)
        return x, tt, enc, want_model(x, tt, enc).sample, unet(x, tt, enc).sample


@pytest.mark.parametrize("all_alpha", [True, False])
def test_diffusers_applies_kohya_input_and_our_outputs_as_our_delta(tmp_path, all_alpha):
    """With an alpha on every module diffusers applies the kohya file itself as we read it. With alpha on only some
    modules (kohya's rule: no alpha = scale 1) diffusers 0.42 applies another module's alpha to them, so only our
    outputs, which carry an alpha on every module, are checked there."""
    unet = tiny_unet()
    layers = dict(unet.named_modules())
    g = torch.Generator().manual_seed(1)
    t = {}
    for i, name in enumerate(PICK):
        w = layers[name].weight
        key = "lora_unet_" + name.replace(".", "_")
        down_shape = (4, *w.shape[1:]) if w.dim() == 4 else (4, w.shape[1])
        up_shape = (w.shape[0], 4, 1, 1) if w.dim() == 4 else (w.shape[0], 4)
        t[f"{key}.lora_down.weight"] = torch.randn(*down_shape, generator=g) * 0.1
        t[f"{key}.lora_up.weight"] = torch.randn(*up_shape, generator=g) * 0.1
        if all_alpha or i % 2 == 0:  # with alpha: scale 0.5; without: scale 1
            t[f"{key}.alpha"] = torch.tensor(2.0)
    src = tmp_path / "kohya.safetensors"
    save_file(t, str(src))
    a = F.load(src)
    assert a.layout["unet.down_blocks.0.resnets.0.conv1"] == (3, 3) and a.layout["unet.down_blocks.0.attentions.0.proj_in"] == (1, 1)
    F.save(a, tmp_path / "out_kohya.safetensors", to="kohya")
    F.save(a, tmp_path / "out_diffusers.safetensors", to="diffusers")

    x, tt, enc, want, base = _dense_reference(unet, a, g)
    for f in [src] * all_alpha + [tmp_path / "out_kohya.safetensors", tmp_path / "out_diffusers.safetensors"]:
        model = copy.deepcopy(unet)
        sd, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(f))
        StableDiffusionLoraLoaderMixin.load_lora_into_unet(sd, alphas, unet=model, adapter_name="x")
        with torch.no_grad():
            got = model(x, tt, enc).sample
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5, msg=str(f))
        assert (got - base).abs().max() > 1e-2


def test_flux_table_matches_diffusers_kohya_converter():
    """diffusers' own converter needs Flux's real widths (3072): rank-1 factors keep the test small."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from adaptermerge.formats import source

    h = 3072
    g = torch.Generator().manual_seed(2)
    shapes = {"double_blocks_0_img_attn_qkv": 3 * h, "double_blocks_0_txt_attn_qkv": 3 * h, "double_blocks_0_img_attn_proj": h,
              "double_blocks_0_txt_mlp_0": 4 * h, "double_blocks_0_img_mod_lin": 6 * h, "single_blocks_0_linear1": 7 * h,
              "single_blocks_0_linear2": h, "single_blocks_0_modulation_lin": 3 * h, "final_layer_adaLN_modulation_1": 2 * h,
              "final_layer_linear": 64}
    t = {}
    for n, rows in shapes.items():
        t[f"lora_unet_{n}.lora_down.weight"] = torch.randn(1, 4, generator=g)
        t[f"lora_unet_{n}.lora_up.weight"] = torch.randn(rows, 1, generator=g)
    theirs = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in t.items()})
    theirs_d = {k[: -len(".lora_A.weight")].removeprefix("transformer."): theirs[k.replace("lora_A", "lora_B")] @ v for k, v in theirs.items() if k.endswith(".lora_A.weight")}
    getter = t.__getitem__
    ours = {}
    mkeys = sorted({k.split(".")[0] for k in t})
    naming = source.resolve_names(mkeys, {}, None, "t")
    for mkey in mkeys:
        parts = {"down": source_entry(t, f"{mkey}.lora_down.weight"), "up": source_entry(t, f"{mkey}.lora_up.weight")}
        spec = source.build_module("t", mkey, parts, getter)
        target = naming.targets[mkey]
        for canon, rows, swap in source._split(spec, target, "t"):
            b, a = source._row_slice(spec.recipe, rows, swap)(getter)
            ours[canon.removeprefix("transformer.")] = b @ a
    assert sorted(ours) == sorted(theirs_d)
    for k in ours:
        assert torch.equal(ours[k], theirs_d[k]), k
    # and the other way: our kohya writer fuses diffusers-named modules back so that diffusers' converter recovers them
    import tempfile
    from pathlib import Path

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as d:
        save_file(t, f"{d}/in.safetensors")
        F.save(F.load(f"{d}/in.safetensors"), Path(d) / "out.safetensors", to="kohya")
        written = load_file(f"{d}/out.safetensors")
    again = _convert_kohya_flux_lora_to_diffusers(dict(written))
    again_d = {k[: -len(".lora_A.weight")].removeprefix("transformer."): again[k.replace("lora_A", "lora_B")] @ v
               for k, v in again.items() if k.endswith(".lora_A.weight")}
    assert sorted(again_d) == sorted(ours)
    for k in ours:
        torch.testing.assert_close(again_d[k], ours[k], rtol=1e-5, atol=1e-5, msg=k)


def source_entry(t, key):
    from adaptermerge.safetensors_io import TensorEntry

    return TensorEntry(key, "F32", tuple(t[key].shape), 0, 0)


def test_diffusers_applies_our_flux_output(tmp_path):
    """A kohya Flux LoRA (BFL names, fused qkv / linear1) converted to diffusers naming, loaded by diffusers into a
    tiny FluxTransformer2DModel: the output equals base + our delta."""
    from diffusers.loaders import FluxLoraLoaderMixin

    torch.manual_seed(0)
    tr = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                          num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                                          guidance_embeds=False, axes_dims_rope=(4, 2, 2)).eval()
    g = torch.Generator().manual_seed(1)
    shapes = {"double_blocks_0_img_attn_qkv": (48, 16), "double_blocks_0_txt_attn_qkv": (48, 16), "double_blocks_0_img_attn_proj": (16, 16),
              "double_blocks_0_img_mlp_0": (64, 16), "double_blocks_0_txt_mlp_2": (16, 64), "double_blocks_0_img_mod_lin": (96, 16),
              "single_blocks_0_linear1": (112, 16), "single_blocks_0_linear2": (16, 80), "single_blocks_0_modulation_lin": (48, 16),
              "final_layer_adaLN_modulation_1": (32, 16), "final_layer_linear": (4, 16)}
    t = {}
    for n, (o, i) in shapes.items():
        t[f"lora_unet_{n}.lora_down.weight"] = torch.randn(4, i, generator=g) * 0.2
        t[f"lora_unet_{n}.lora_up.weight"] = torch.randn(o, 4, generator=g) * 0.2
        t[f"lora_unet_{n}.alpha"] = torch.tensor(2.0)
    save_file(t, str(tmp_path / "flux.safetensors"))
    a = F.load(tmp_path / "flux.safetensors")
    F.save(a, tmp_path / "d.safetensors", to="diffusers")
    inputs = dict(hidden_states=torch.randn(1, 6, 4, generator=g), encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
                  pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]), img_ids=torch.zeros(6, 3),
                  txt_ids=torch.zeros(3, 3))
    want_m = copy.deepcopy(tr)
    named = dict(want_m.named_modules())
    with torch.no_grad():
        for n in a.modules:
            named[n.split(".", 1)[1]].weight += a.delta(n)
        want, base = want_m(**inputs).sample, tr(**inputs).sample
    model = copy.deepcopy(tr)
    sd = FluxLoraLoaderMixin.lora_state_dict(str(tmp_path / "d.safetensors"))
    sd = sd[0] if isinstance(sd, tuple) else sd
    FluxLoraLoaderMixin.load_lora_into_transformer(sd, None, transformer=model, adapter_name="x")
    with torch.no_grad():
        got = model(**inputs).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - base).abs().max() > 1e-2


def test_peft_loads_our_peft_output_of_a_kohya_unet_lora(tmp_path):
    """kohya (UNet only) -> PEFT adapter folder: peft.PeftModel.from_pretrained on the UNet gives base + our delta
    (linear, 1x1 and 3x3 conv modules)."""
    import peft

    unet = tiny_unet()
    layers = dict(unet.named_modules())
    g = torch.Generator().manual_seed(3)
    t = {}
    for name in PICK:
        w = layers[name].weight
        key = "lora_unet_" + name.replace(".", "_")
        t[f"{key}.lora_down.weight"] = torch.randn(4, *w.shape[1:], generator=g) * 0.1
        t[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], 4, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.1
        t[f"{key}.alpha"] = torch.tensor(8.0)
    save_file(t, str(tmp_path / "k.safetensors"))
    a = F.load(tmp_path / "k.safetensors")
    F.save(a, tmp_path / "p", to="peft")
    x, tt, enc, want, base = _dense_reference(unet, a, g)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(unet), str(tmp_path / "p")).eval()
    with torch.no_grad():
        got = model(x, tt, enc).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)
    assert (got - base).abs().max() > 1e-2


def test_ldm_named_kohya_lora_matches_diffusers(tmp_path):
    """A kohya LoRA in Stable Diffusion's original (LDM) UNet names: our mapping gives the deltas diffusers applies."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
    ).eval()
    layers = dict(unet.named_modules())
    ldm = {"input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
           "input_blocks_2_1_transformer_blocks_0_attn1_to_q": "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",
           "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
           "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
           "middle_block_1_proj_in": "mid_block.attentions.0.proj_in",
           "middle_block_2_emb_layers_1": "mid_block.resnets.1.time_emb_proj",
           "output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",
           "output_blocks_4_1_transformer_blocks_0_ff_net_2": "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2",
           "output_blocks_5_0_out_layers_3": "up_blocks.1.resnets.2.conv2"}
    g = torch.Generator().manual_seed(4)
    t = {}
    for name, path in ldm.items():
        w = layers[path].weight
        t[f"lora_unet_{name}.lora_down.weight"] = torch.randn(4, *w.shape[1:], generator=g) * 0.1
        t[f"lora_unet_{name}.lora_up.weight"] = torch.randn(w.shape[0], 4, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.1
        t[f"lora_unet_{name}.alpha"] = torch.tensor(2.0)
    save_file(t, str(tmp_path / "ldm_all.safetensors"))
    a = F.load(tmp_path / "ldm_all.safetensors")
    assert sorted(a.modules) == sorted(f"unet.{p}" for p in ldm.values())
    assert "LDM" in a.coverage.mapping
    # diffusers 0.42 maps the upsampler of a level without attention (output block slot 1) to a non-existent
    # 'attentions.2.conv' and so drops it; compare the rest with what diffusers applies
    t = {k: v for k, v in t.items() if not k.startswith("lora_unet_output_blocks_2_1_conv.")}
    save_file(t, str(tmp_path / "ldm.safetensors"))
    a = F.load(tmp_path / "ldm.safetensors")
    x, tt, enc, want, base = _dense_reference(unet, a, g)
    model = copy.deepcopy(unet)
    sd, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(tmp_path / "ldm.safetensors"), unet_config=unet.config)
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(sd, alphas, unet=model, adapter_name="x")
    with torch.no_grad():
        got = model(x, tt, enc).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)
    assert (got - base).abs().max() > 1e-2


def test_sdxl_ldm_names_map_as_diffusers_maps_them(tmp_path):
    """SDXL LoRAs from sd-scripts use SGM/LDM UNet names. For every such module of SDXL's structure (3 levels, 2
    resnets each, attention with up to 10 transformer blocks in levels 1-2), our diffusers path equals the one
    diffusers' own mapping gives (only its name, so no model is built)."""
    from types import SimpleNamespace

    from adaptermerge.formats import names as N

    names = ["input_blocks_0_0", "time_embed_0", "label_emb_0_2", "out_2", "input_blocks_3_0_op", "input_blocks_6_0_op",
             "input_blocks_1_0_in_layers_2", "input_blocks_2_0_emb_layers_1", "input_blocks_4_0_skip_connection",
             "input_blocks_4_1_proj_in", "input_blocks_8_1_transformer_blocks_9_attn2_to_k", "input_blocks_7_1_transformer_blocks_0_ff_net_0_proj",
             "middle_block_0_out_layers_3", "middle_block_1_transformer_blocks_3_attn1_to_out_0", "middle_block_2_in_layers_2",
             "output_blocks_0_0_skip_connection", "output_blocks_2_1_transformer_blocks_5_attn1_to_v", "output_blocks_2_2_conv",
             "output_blocks_5_2_conv", "output_blocks_4_1_proj_out", "output_blocks_8_0_out_layers_3"]
    t = {}
    for n in names:
        t[f"lora_unet_{n}.lora_down.weight"] = torch.zeros(1, 4)
        t[f"lora_unet_{n}.lora_up.weight"] = torch.zeros(4, 1)
    save_file(t, str(tmp_path / "sdxl.safetensors"))
    sd, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(str(tmp_path / "sdxl.safetensors"), unet_config=SimpleNamespace(layers_per_block=2))
    theirs = set()
    for k in sd:
        if k.endswith("down.weight") and k.startswith("unet."):
            path = k[len("unet."):].replace(".lora.down.weight", "")
            for proj in ("to_q", "to_k", "to_v"):
                path = path.replace(f".processor.{proj}_lora.down.weight", f".{proj}")
            theirs.add(path.replace(".processor.to_out_lora.down.weight", ".to_out.0"))
    ours = {N.ldm_unet_path(n) for n in names}
    assert None not in ours
    assert ours == theirs
