"""CLIP backend: every accepted checkpoint format through the CLI, and a guard for each trap in docs/models/clip.md."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tpas.cli import app
from tpas.errors import TpasInputError
from tpas.models import load_model
from tpas.models.clip import _read_checkpoint, _resolve_config, build_open_clip, infer_geometry
from tpas.sims import SimsMatrix

if TYPE_CHECKING:
    from tests.models.conftest import TinyGallery

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"


def _oc():
    import open_clip

    return open_clip


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, clip_kit: SimpleNamespace) -> SimpleNamespace:
    """The same tiny weights in every accepted format (values as OpenAI ships them: fp16-rounded where fp16)."""
    release = clip_kit.openai_release_state(clip_kit.state())
    plain = {k: v.float() for k, v in release.items() if k not in clip_kit.meta}  # the numbers every format holds
    d = tmp_path_factory.mktemp("ckpt")
    oc_cfg = {"model_cfg": clip_kit.cfg, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073]}}
    hf_bin, hf_st = d / "hf_bin", d / "hf_st"
    for folder in (hf_bin, hf_st):
        folder.mkdir()
        (folder / "open_clip_config.json").write_text(json.dumps(oc_cfg))
    torch.save(plain, hf_bin / "open_clip_pytorch_model.bin")
    from safetensors.torch import save_file

    save_file(plain, str(hf_st / "open_clip_model.safetensors"))
    torch.save(release, d / "openai_state.pt")
    torch.save(plain, d / "bare.bin")  # no metadata, no fp16: the activation must be stated
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in plain.items()}}, d / "epoch_3.pt")
    tiny_yaml = d / "tiny.yaml"
    tiny_yaml.write_text(json.dumps({"family": "clip", "model_cfg": clip_kit.cfg}))  # JSON is YAML
    return SimpleNamespace(
        plain=plain,
        torchscript=clip_kit.save_torchscript_archive(release, d / "ViT-tiny.pt"),
        openai_state=d / "openai_state.pt",
        hf_bin=hf_bin,
        hf_st=hf_st,
        bare=d / "bare.bin",
        train=d / "epoch_3.pt",
        tiny_yaml=tiny_yaml,
    )


def _cli(g: TinyGallery, out: Path, *args: str):
    return CliRunner().invoke(app, ["infer", "clip", "--images", str(g.images), "--queries", str(g.queries),
                                    "--out", str(out), "--workers", "0", "--batch-size", "3", *args])  # fmt: skip


def _reference_sims(g: TinyGallery, state: dict, cfg: dict) -> torch.Tensor:
    """Straight open_clip: CLIP(**cfg, quick_gelu) + image_transform + tokenize, one image at a time, cosine."""
    oc = _oc()
    model = oc.model.CLIP(**cfg).eval()
    model.load_state_dict(state)
    tf = oc.image_transform(cfg["vision_cfg"]["image_size"], is_train=False)
    paths = {p.stem: p for p in g.images.rglob("*.jpg")}
    with torch.no_grad():
        img = torch.cat([model.encode_image(tf(Image.open(paths[i]))[None], normalize=True) for i in g.gallery_ids])
        txt = model.encode_text(oc.tokenize(g.captions), normalize=True)
    return txt @ img.T


def test_every_checkpoint_format_through_the_cli(tiny_gallery: TinyGallery, files: SimpleNamespace,
                                                 clip_kit: SimpleNamespace, tmp_path: Path) -> None:  # fmt: skip
    runs = {
        "torchscript": [str(files.torchscript)],
        "openai-state-dict": [str(files.openai_state)],
        "open_clip-bin-file": [str(files.hf_bin / "open_clip_pytorch_model.bin")],
        "open_clip-safetensors-dir": [str(files.hf_st)],
        "bare-with-config": [str(files.bare), "--config", str(files.tiny_yaml)],
        "training-checkpoint": [str(files.train), "--config", str(files.tiny_yaml)],
    }
    results = {}
    for name, (ckpt, *extra) in runs.items():
        out = tmp_path / "out" / f"{name}.pt"
        r = _cli(tiny_gallery, out, "--checkpoint", ckpt, "--no-cache", *extra)
        assert r.exit_code == 0, (name, r.output, r.exception)
        results[name] = SimsMatrix.load(out)
    ref = _reference_sims(tiny_gallery, files.plain, clip_kit.cfg)
    for name, m in results.items():
        assert m.source == "clip" and m.gallery_ids == tiny_gallery.gallery_ids, name
        assert m.meta["model"]["quick_gelu"] is True, name
        torch.testing.assert_close(m.scores, ref, atol=2e-6, rtol=0, msg=name)
    assert results["torchscript"].meta["model"]["checkpoint_format"] == "openai-torchscript"


def test_openai_release_is_read_as_quickgelu_fp32_without_metadata(files: SimpleNamespace) -> None:
    state, info = _read_checkpoint(files.torchscript, trust=False)
    assert info["openai"] and info["meta"] == {"input_resolution": 32, "context_length": 77, "vocab_size": 49408}
    assert not {"input_resolution", "context_length", "vocab_size"} & set(state)
    assert all(v.dtype == torch.float32 for v in state.values())
    model = load_model("clip", files.torchscript)
    act = model.clip.visual.transformer.resblocks[0].mlp.gelu
    assert type(act).__name__ == "QuickGELU"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # Plain fp16-pattern state dict without metadata keys: still recognised as OpenAI's release.
    release = torch.load(files.openai_state, weights_only=True)
    for k in ("input_resolution", "context_length", "vocab_size"):
        release.pop(k)
    path = files.bare.with_name("fp16_pattern.pt")
    torch.save(release, path)
    assert _read_checkpoint(path, trust=False)[1]["openai"]


def test_activation_mismatch_is_refused(files: SimpleNamespace, clip_kit: SimpleNamespace, tmp_path: Path) -> None:
    gelu_cfg = {**clip_kit.cfg, "quick_gelu": False}
    with pytest.raises(TpasInputError, match=r"QuickGELU.*builds GELU"):
        load_model("clip", files.torchscript, {"model_cfg": gelu_cfg})
    with pytest.raises(TpasInputError, match="cannot tell"):
        load_model("clip", files.bare)
    # A stated GELU on weights that show no activation is taken at its word, and then differs from QuickGELU.
    gelu = load_model("clip", files.bare, {"model_cfg": gelu_cfg})
    assert type(gelu.clip.visual.transformer.resblocks[0].mlp.gelu).__name__ == "GELU"
    # open_clip_config.json says QuickGELU; a config stating GELU contradicts it.
    with pytest.raises(TpasInputError, match=r"open_clip_config\.json"):
        load_model("clip", files.hf_bin, {"model_cfg": gelu_cfg})
    with pytest.raises(TpasInputError, match="-quickgelu"):
        load_model("clip", files.torchscript, arch="ViT-B-32")


def test_geometry_mismatch_is_refused_not_interpolated(files: SimpleNamespace, clip_kit: SimpleNamespace,
                                                       tmp_path: Path) -> None:  # fmt: skip
    big = json.loads(json.dumps(clip_kit.cfg))
    big["vision_cfg"]["image_size"] = 64
    with pytest.raises(TpasInputError, match="image_size: checkpoint 32, config 64"):
        load_model("clip", files.torchscript, {"model_cfg": big})
    with pytest.raises(TpasInputError, match="does not fit ViT-B-32-quickgelu"):
        load_model("clip", files.torchscript, arch="ViT-B-32-quickgelu")
    with pytest.raises(TpasInputError, match="not an open_clip architecture"):
        load_model("clip", files.torchscript, arch="ViT-Q-99")
    bad_meta = torch.load(files.openai_state, weights_only=True)
    bad_meta["input_resolution"] = torch.tensor(64)
    torch.save(bad_meta, tmp_path / "badmeta.pt")
    with pytest.raises(TpasInputError, match="input_resolution 64"):
        load_model("clip", tmp_path / "badmeta.pt")


def test_no_downloads_hub_tags_and_missing_files_say_what_to_get(tiny_gallery: TinyGallery, tmp_path: Path) -> None:
    with pytest.raises(TpasInputError, match=r"hub tag.*ViT-L-14-336px\.pt.*--checkpoint checkpoints/"):
        load_model("clip", Path("openai"))
    with pytest.raises(TpasInputError, match=r"clip needs --checkpoint.*download"):
        load_model("clip", None)
    with pytest.raises(TpasInputError, match="checkpoint not found"):
        load_model("clip", tmp_path / "nope.pt")
    r = _cli(tiny_gallery, tmp_path / "o.pt", "--checkpoint", "openai")
    assert isinstance(r.exception, TpasInputError) and "huggingface.co/timm/vit_large_patch14_clip_336" in str(
        r.exception
    )
    r = _cli(tiny_gallery, tmp_path / "o.pt", "--checkpoint", "x.pt", "--vocab", "v.txt")
    assert isinstance(r.exception, TpasInputError) and "--vocab" in str(r.exception)
    assert not (tmp_path / "o.pt").exists()


def test_preprocess_and_tokenizer_are_open_clips(files: SimpleNamespace) -> None:
    oc = _oc()
    model = load_model("clip", files.torchscript)
    tf = oc.image_transform(32, is_train=False)
    rgba = Image.new("RGBA", (50, 37), (10, 200, 30, 128))
    pal = Image.new("RGB", (41, 64), (250, 20, 30)).convert("P")
    for im in (rgba, pal, Image.new("L", (33, 33), 77)):
        assert torch.equal(model.preprocess(im)["pixels"], tf(im))
    long = "a person " * 60
    ids = model.tokenize(["a man falls", long])["input_ids"]
    assert ids.shape == (2, 77) and torch.equal(ids, oc.tokenize(["a man falls", long]))
    assert int(ids[1, -1]) == 49407  # truncated: EOT kept in the last slot
    d = model.describe()
    assert d["preprocess"]["image_size"] == 32 and d["tokenizer"]["context_length"] == 77
    # Workers get a small picklable transform, never the weights (spawn-based platforms pickle it).
    import pickle

    blob = pickle.dumps(model.image_preprocessor)
    assert len(blob) < 20_000
    assert torch.equal(pickle.loads(blob)(rgba)["pixels"], tf(rgba))


def test_full_size_openai_layout_resolves_to_vit_l14_336_quickgelu() -> None:
    """The release's key -> shape layout (tests/fixtures copy) builds exactly ViT-L-14-336-quickgelu, strict."""
    layout = json.loads((FIXTURES / "clip_openai_vit_l14_336_layout.json").read_text())["keys"]
    dtypes = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}
    state = {k: torch.empty(shape, dtype=dtypes[dt], device="meta") for k, (shape, dt) in layout.items()}
    meta = {k: state.pop(k) for k in ("input_resolution", "context_length", "vocab_size")}
    assert all(v.dtype == torch.int64 and v.ndim == 0 for v in meta.values())
    info = {"openai": True, "open_clip_config": None, "meta": {}, "file": Path("ViT-L-14-336px.pt")}
    name, cfg, pre = _resolve_config(state, info, None, None)
    assert name == "ViT-L-14-336-quickgelu" and cfg["quick_gelu"] is True and pre["image_size"] == 336
    assert infer_geometry(state)["vision_cfg"] == {"image_size": 336, "layers": 24, "width": 1024, "patch_size": 14}
    # The repo's configs/models/clip.yaml agrees with the release, and plain GELU ViT-L-14-336 is refused.
    import yaml

    shipped = yaml.safe_load((REPO / "configs" / "models" / "clip.yaml").read_text())
    assert _resolve_config(state, info, shipped, None)[0] == "ViT-L-14-336-quickgelu"
    with pytest.raises(TpasInputError, match="ViT-L-14-336-quickgelu"):
        _resolve_config(state, info, None, "ViT-L-14-336")
    with torch.device("meta"):
        model = build_open_clip(cfg)
    built = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert built == {k: tuple(v.shape) for k, v in state.items()}
    oc_layout = json.loads((FIXTURES / "clip_open_clip_vit_l14_336_layout.json").read_text())["keys"]
    assert {k: tuple(s) for k, (s, _) in oc_layout.items()} == built


def test_shipped_config_refuses_a_checkpoint_it_does_not_describe(tiny_gallery: TinyGallery, files: SimpleNamespace,
                                                                  tmp_path: Path) -> None:  # fmt: skip
    r = _cli(tiny_gallery, tmp_path / "o.pt", "--checkpoint", str(files.torchscript), "--config",
             str(REPO / "configs" / "models" / "clip.yaml"))  # fmt: skip
    assert isinstance(r.exception, TpasInputError)
    assert "does not fit ViT-L-14-336-quickgelu" in str(r.exception) and "image_size: checkpoint 32" in str(r.exception)
    other = tmp_path / "beit.yaml"
    other.write_text("family: beit3\n")
    r = _cli(tiny_gallery, tmp_path / "o.pt", "--checkpoint", str(files.torchscript), "--config", str(other))
    assert isinstance(r.exception, TpasInputError) and "not 'clip'" in str(r.exception)


def test_cpu_bf16_through_the_cli_equals_open_clips_own_bf16_forward(
    tiny_gallery: TinyGallery, files: SimpleNamespace, clip_kit: SimpleNamespace, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from tpas.runtime import cpu_has_bf16

    args = ["--checkpoint", str(files.hf_st), "--no-cache", "--device", "cpu", "--precision", "bf16"]
    out = tmp_path / "bf16.pt"
    if cpu_has_bf16():
        # One batch of every image (and of every caption): bf16 results depend on the batch's composition.
        r = _cli(tiny_gallery, out, *args, "--batch-size", str(len(tiny_gallery.gallery_ids)))
        assert r.exit_code == 0, (r.output, r.exception)
        oc = _oc()
        model = oc.model.CLIP(**clip_kit.cfg).eval()
        model.load_state_dict(files.plain)
        model = model.to(torch.bfloat16)
        tf = oc.image_transform(clip_kit.cfg["vision_cfg"]["image_size"], is_train=False)
        paths = {p.stem: p for p in tiny_gallery.images.rglob("*.jpg")}
        with torch.no_grad():
            pixels = torch.stack([tf(Image.open(paths[i])) for i in tiny_gallery.gallery_ids]).bfloat16()
            norm = torch.nn.functional.normalize  # in fp32, of the bf16 features
            img = norm(model.encode_image(pixels).float(), dim=-1)
            txt = norm(model.encode_text(oc.tokenize(tiny_gallery.captions)).float(), dim=-1)
        m = SimsMatrix.load(out)
        torch.testing.assert_close(m.scores, txt @ img.T, atol=1e-6, rtol=0)
        assert m.meta["precision"] == "bf16"
        assert (m.scores - _reference_sims(tiny_gallery, files.plain, clip_kit.cfg)).abs().max() > 1e-4
    from tpas.cli import main

    monkeypatch.setattr("tpas.runtime.cpu_has_bf16", lambda: False)
    refused = tmp_path / "refused.pt"
    argv = ["infer", "clip", "--images", str(tiny_gallery.images), "--queries", str(tiny_gallery.queries), *args]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(refused)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "needs native bf16" in err, err
    assert not refused.exists()
