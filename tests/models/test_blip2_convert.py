"""LAVIS -> transformers BLIP-2 conversion: full-size key coverage (shapes only) and tiny end-to-end conversions.

The tiny LAVIS checkpoints are built from the reference layout's own key list (tests/fixtures/
blip2_lavis_pretrain_layout.json) with every dimension shrunk, so they carry exactly the released key names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tpas.cli import main
from tpas.errors import TpasInputError
from tpas.models.blip2_convert import (
    MODEL_TYPES,
    VIT_PREFIX,
    apply_keymap,
    build_hf_config,
    check_against_hf,
    infer_model_type,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MODEL_TYPE_NAMES = ("pretrain", "pretrain_vitL")

# Full-size dimension -> tiny dimension. ViT-file keys use the ViT map; Q-Former keys the Q-Former map, plus the ViT
# width for the cross-attention key/value inputs and ln_vision.
TINY_VIT = {
    "pretrain": {1408: 176, 6144: 64, 4224: 528, 257: 5},  # 2 heads of 88; 28 px / 14 px patches -> 1 + 4 positions
    "pretrain_vitL": {1024: 128, 4096: 64, 3072: 384, 257: 5},  # 2 heads of 64
}
TINY_QFORMER = {768: 64, 3072: 128, 512: 64, 256: 16}  # 1 head of 64; 32 queries and the 30,523 vocab kept
TINY_VIT_BLOCKS = 2
TINY_QFORMER_LAYERS = 2  # layer 0 has cross-attention, layer 1 not (frequency 2)


def reference_layout() -> dict:
    return json.loads((FIXTURES / "blip2_lavis_pretrain_layout.json").read_text())


def _index(key: str, pattern: str) -> int | None:
    m = re.search(pattern, key)
    return int(m.group(1)) if m else None


def tiny_lavis_state(model_type: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(Q-Former state as under ['model'], bare ViT state) with the reference key names and tiny random tensors."""
    ref = reference_layout()["checkpoints"][model_type]
    gen = torch.Generator().manual_seed(seed)
    vit_width = {"pretrain": 1408, "pretrain_vitL": 1024}[model_type]

    def tensor(key: str, shape: list[int], dtype: str, dims: dict[int, int]) -> torch.Tensor:
        tiny = [dims.get(d, d) for d in shape]
        if dtype == "int64":
            return torch.arange(tiny[-1]).expand(tiny).clone()
        if re.search(r"(norm\d?|LayerNorm|ln_\w+|ln_vision)\.weight$", key):
            return 1 + 0.1 * torch.randn(tiny, generator=gen)
        scale = 0.5 if re.search(r"embed|token|embedding", key) else 0.15
        return scale * torch.randn(tiny, generator=gen)

    qformer: dict[str, torch.Tensor] = {}
    for key, (shape, dtype) in ref["qformer_checkpoint"]["layout"]["model"].items():
        layer = _index(key, r"encoder\.layer\.(\d+)\.")
        if layer is not None and layer >= TINY_QFORMER_LAYERS:
            continue
        qformer[key] = tensor(key, shape, dtype, {**TINY_QFORMER, vit_width: TINY_VIT[model_type][vit_width]})
    # The released file ties the LM decoder to the word embeddings (both names present, one tensor).
    qformer["Qformer.cls.predictions.decoder.weight"] = qformer["Qformer.bert.embeddings.word_embeddings.weight"]
    qformer["Qformer.cls.predictions.decoder.bias"] = qformer["Qformer.cls.predictions.bias"]

    vit: dict[str, torch.Tensor] = {}
    for key, (shape, dtype) in ref["vit_checkpoint"]["layout_used_by_lavis"].items():
        block = _index(key, r"(?:blocks|resblocks)\.(\d+)\.")
        if block is not None and block >= TINY_VIT_BLOCKS:
            continue
        vit[key] = tensor(key, shape, dtype, TINY_VIT[model_type])
    return qformer, vit


def save_tiny_lavis(tmp: Path, model_type: str, seed: int = 0, **extra_vit: torch.Tensor) -> tuple[Path, Path]:
    """Write the tiny pair as released: torch.save({'model': ...}) and a bare ViT state dict."""
    qformer, vit = tiny_lavis_state(model_type, seed)
    vit.update(extra_vit)
    q_path, v_path = tmp / f"{model_type}_qformer.pth", tmp / f"{model_type}_vit.pth"
    torch.save({"model": qformer, "epoch": 9}, q_path)
    torch.save(vit, v_path)
    return q_path, v_path


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run the console entry point in-process: (exit code, stdout + stderr)."""
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return code, out.out + out.err


def convert_cli(capsys, q_path: Path, v_path: Path, out: Path, *args: str) -> tuple[int, str]:
    return run_cli(
        capsys,
        "convert",
        "blip2-lavis",
        str(q_path),
        "--vit",
        str(v_path),
        "--out",
        str(out),
        "--vit-layers",
        str(TINY_VIT_BLOCKS),
        *args,
    )


def tiny_converted(capsys, tmp: Path, model_type: str, seed: int = 0) -> Path:
    """Convert a tiny LAVIS pair through the CLI; returns the transformers directory."""
    q_path, v_path = save_tiny_lavis(tmp, model_type, seed)
    out = tmp / f"{model_type}-hf"
    code, output = convert_cli(capsys, q_path, v_path, out)
    assert code == 0, output
    return out


# ----------------------------------------------------------------------------------------------- full size
@pytest.mark.parametrize("model_type", MODEL_TYPE_NAMES)
def test_full_size_keymap_produces_exactly_the_hf_layout(model_type):
    """Every key of the released Q-Former + ViT files is mapped or dropped, giving exactly the HF keys and shapes."""
    ref = reference_layout()["checkpoints"][model_type]
    hf_ref = json.loads((FIXTURES / "blip2_hf_itm_layout.json").read_text())["models"][model_type]
    lavis = {
        k: torch.empty(shape, device="meta") for k, (shape, _) in ref["qformer_checkpoint"]["layout"]["model"].items()
    }
    lavis |= {
        VIT_PREFIX + k: torch.empty(s, device="meta")
        for k, (s, _) in ref["vit_checkpoint"]["layout_used_by_lavis"].items()
    }
    assert infer_model_type(lavis) == model_type

    depth = MODEL_TYPES[model_type].lavis_depth
    config = build_hf_config(lavis, model_type, vit_depth=depth)
    mapped = apply_keymap(lavis, model_type, vit_depth=depth)

    produced = {k: list(v.shape) for k, v in mapped.hf.items()}
    expected = {k: shape for k, (shape, _) in hf_ref["layout"].items()}
    assert produced == expected
    assert len(mapped.dropped) == 9  # temp, the position_ids buffer, 7 captioning-head tensors
    assert sorted(mapped.extra) == (["ln_pre.bias", "ln_pre.weight"] if model_type == "pretrain_vitL" else [])
    check_against_hf(mapped.hf, config, Path("meta"))  # the config builds a model of exactly these shapes
    for section in ("vision_config", "qformer_config"):
        for key, value in config[section].items():
            assert hf_ref["config"][section][key] == value, (section, key)
    assert config["image_token_index"] is None


def test_full_size_released_vit_extras_are_dropped_not_mapped():
    """Released ViT files may hold a 40th EVA block and a final norm; LAVIS never reads them, nor does the map."""
    ref = reference_layout()["checkpoints"]["pretrain"]
    lavis = {k: torch.empty(s, device="meta") for k, (s, _) in ref["qformer_checkpoint"]["layout"]["model"].items()}
    vit = {k: torch.empty(s, device="meta") for k, (s, _) in ref["vit_checkpoint"]["layout_used_by_lavis"].items()}
    vit |= {k.replace("blocks.38.", "blocks.39."): v for k, v in vit.items() if k.startswith("blocks.38.")}
    vit["norm.weight"] = torch.empty(1408, device="meta")
    lavis |= {VIT_PREFIX + k: v for k, v in vit.items()}
    mapped = apply_keymap(lavis, "pretrain", vit_depth=39)
    assert "visual_encoder.blocks.39.attn.q_bias" in mapped.dropped
    assert "visual_encoder.norm.weight" in mapped.dropped
    assert not any(".layers.39." in k for k in mapped.hf)


# ----------------------------------------------------------------------------------------------- tiny files
@pytest.mark.parametrize("model_type", MODEL_TYPE_NAMES)
def test_tiny_conversion_through_cli_maps_every_tensor(tmp_path, capsys, model_type):
    """The CLI writes config + weights + tokenizer; tensors land where the key map says, q/v bias concatenated."""
    from safetensors.torch import load_file

    out = tiny_converted(capsys, tmp_path, model_type)
    qformer, vit = tiny_lavis_state(model_type)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json"} <= names
    assert ("lavis_ln_pre.safetensors" in names) == (model_type == "pretrain_vitL")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind

    hf = load_file(str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert config["lavis"]["model_type"] == model_type
    assert config["image_token_index"] is None
    assert config["qformer_config"]["vocab_size"] == 30523
    assert config["vision_config"]["num_hidden_layers"] == TINY_VIT_BLOCKS
    torch.testing.assert_close(hf["query_tokens"], qformer["query_tokens"], rtol=0, atol=0)
    torch.testing.assert_close(hf["vision_model.post_layernorm.weight"], qformer["ln_vision.weight"], rtol=0, atol=0)
    torch.testing.assert_close(
        hf["qformer.encoder.layer.0.crossattention.attention.key.weight"],
        qformer["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"],
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(
        hf["qformer.layernorm.bias"], qformer["Qformer.bert.embeddings.LayerNorm.bias"], rtol=0, atol=0
    )
    if model_type == "pretrain":
        q, v = vit["blocks.1.attn.q_bias"], vit["blocks.1.attn.v_bias"]
        torch.testing.assert_close(
            hf["vision_model.encoder.layers.1.self_attn.qkv.bias"],
            torch.cat([q, torch.zeros_like(q), v]),
            rtol=0,
            atol=0,
        )
        assert config["vision_config"]["hidden_act"] == "gelu"
    else:
        ln_pre = load_file(str(out / "lavis_ln_pre.safetensors"))
        torch.testing.assert_close(ln_pre["ln_pre.weight"], vit["ln_pre.weight"], rtol=0, atol=0)
        torch.testing.assert_close(
            hf["vision_model.embeddings.class_embedding"].flatten(), vit["class_embedding"], rtol=0, atol=0
        )
        assert hf["vision_model.embeddings.position_embedding"].shape == (1, 5, 128)
        assert torch.count_nonzero(hf["vision_model.embeddings.patch_embedding.bias"]) == 0
        torch.testing.assert_close(
            hf["vision_model.encoder.layers.0.self_attn.qkv.weight"],
            vit["transformer.resblocks.0.attn.in_proj_weight"],
            rtol=0,
            atol=0,
        )
        assert config["vision_config"]["hidden_act"] == "quick_gelu"
        assert config["lavis"]["ln_pre"] is True


def test_unknown_key_is_an_error_naming_it(tmp_path, capsys):
    qformer, vit = tiny_lavis_state("pretrain")
    qformer["Qformer.bert.encoder.layer.0.adapter.weight"] = torch.zeros(3)
    q_path, v_path = tmp_path / "q.pth", tmp_path / "v.pth"
    torch.save({"model": qformer}, q_path)
    torch.save(vit, v_path)
    out = tmp_path / "out"
    code, output = convert_cli(capsys, q_path, v_path, out)
    assert code == 2
    assert "Qformer.bert.encoder.layer.0.adapter.weight" in output and "q.pth" in output
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["q.pth", "v.pth"]


def test_unknown_vit_key_names_the_vit_file(tmp_path, capsys):
    q_path, v_path = save_tiny_lavis(tmp_path, "pretrain_vitL", **{"transformer.resblocks.0.attn.gate": torch.zeros(1)})
    code, output = convert_cli(capsys, q_path, v_path, tmp_path / "out")
    assert code == 2
    assert "visual_encoder.transformer.resblocks.0.attn.gate" in output and v_path.name in output


def test_model_type_must_agree_with_the_vit(tmp_path, capsys):
    q_path, v_path = save_tiny_lavis(tmp_path, "pretrain_vitL")
    code, output = convert_cli(capsys, q_path, v_path, tmp_path / "out", "--model-type", "pretrain")
    assert code == 2 and "disagrees" in output
    code, output = convert_cli(capsys, q_path, v_path, tmp_path / "out", "--model-type", "vitG")
    assert code == 2 and "--model-type" in output


def test_qformer_and_vit_of_different_model_types_are_refused(tmp_path, capsys):
    q_path, _ = save_tiny_lavis(tmp_path, "pretrain")
    _, v_path = save_tiny_lavis(tmp_path, "pretrain_vitL")
    code, output = convert_cli(capsys, q_path, v_path, tmp_path / "out")
    assert code == 2 and "ln_vision" in output


def test_released_vit_extras_dropped_and_default_depth_needs_full_vit(tmp_path, capsys):
    extras = {"ln_post.weight": torch.ones(128), "ln_post.bias": torch.zeros(128), "proj": torch.zeros(128, 16)}
    _, vit = tiny_lavis_state("pretrain_vitL")
    extras |= {k.replace("resblocks.1.", "resblocks.2."): v for k, v in vit.items() if "resblocks.1." in k}
    q_path, v_path = save_tiny_lavis(tmp_path, "pretrain_vitL", **extras)
    # Keeps 2 of the 3 blocks, as LAVIS keeps 23 of the 24 in clip_vit_L.pth.
    code, output = convert_cli(capsys, q_path, v_path, tmp_path / "out")
    assert code == 0, output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vision_config"]["num_hidden_layers"] == 2

    code, output = run_cli(
        capsys, "convert", "blip2-lavis", str(q_path), "--vit", str(v_path), "--out", str(tmp_path / "out2")
    )
    assert code == 2 and "uses 23" in output and "--vit-layers" in output


def test_existing_output_needs_overwrite(tmp_path, capsys):
    q_path, v_path = save_tiny_lavis(tmp_path, "pretrain")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, output = convert_cli(capsys, q_path, v_path, out)
    assert code == 2 and "--overwrite" in output
    assert (out / "keep.txt").exists()
    code, output = convert_cli(capsys, q_path, v_path, out, "--overwrite")
    assert code == 0, output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_vocab_must_match_the_embedding_rows(tmp_path, capsys):
    q_path, v_path = save_tiny_lavis(tmp_path, "pretrain")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("".join(f"{t}\n" for t in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghij"]))
    code, output = convert_cli(capsys, q_path, v_path, tmp_path / "out", "--vocab", str(vocab))
    assert code == 2 and "30523" in output and "16 tokens" in output


def test_library_rejects_missing_partner_key():
    qformer, vit = tiny_lavis_state("pretrain")
    del vit["blocks.0.attn.v_bias"]
    lavis = qformer | {VIT_PREFIX + k: v for k, v in vit.items()}
    with pytest.raises(TpasInputError, match="v_bias"):
        apply_keymap(lavis, "pretrain", vit_depth=TINY_VIT_BLOCKS)


def test_pickled_extras_need_trust_checkpoint(tmp_path, capsys):
    """A LAVIS training checkpoint may carry a pickled config object next to ['model']: refused unless trusted."""
    import argparse

    qformer, vit = tiny_lavis_state("pretrain")
    q_path, v_path = tmp_path / "q.pth", tmp_path / "v.pth"
    torch.save({"model": qformer, "config": argparse.Namespace(run="pretrain")}, q_path)
    torch.save(vit, v_path)
    code, output = convert_cli(capsys, q_path, v_path, tmp_path / "out")
    assert code == 2 and "--trust-checkpoint" in output and "q.pth" in output
    code, output = convert_cli(capsys, q_path, v_path, tmp_path / "out", "--trust-checkpoint")
    assert code == 0, output
