"""The one checkpoint-opening path: what a file looks like decides whether it is deserialised, and every refusal
(through `tpas infer FAMILY` too) is one line naming the file, exit 2."""

from __future__ import annotations

import argparse
import gzip
import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from tpas.errors import TpasInputError
from tpas.models.checkpoint import load_checkpoint, sniff

STATE = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2, dtype=torch.int64)}


def _torch_zip(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _tar(inner: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("model.pth")
        info.size = len(inner)
        t.addfile(info, io.BytesIO(inner))
    return buf.getvalue()


def _zip(**members: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


GOOD = _torch_zip({"model": STATE})
REFUSED = {
    "empty": (b"", "empty file (0 bytes): the download probably failed"),
    "html": (b"<!DOCTYPE html>\n<html><body>Sign in</body></html>", "HTML page"),
    "lfs": (b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 99\n", "Git LFS pointer"),
    "json": (b'{"architectures": ["Blip2"]}', "JSON text"),
    "text": (b"model weights go here\n", "text file"),
    "gzip": (gzip.compress(GOOD), "gzip archive"),
    "tar": (_tar(GOOD), "tar archive"),
    "zip": (_zip(**{"readme.txt": b"hi"}), "zip archive that torch.save did not write (1 entries: readme.txt)"),
    "truncated_zip": (GOOD[: len(GOOD) // 2], "truncated or damaged zip archive"),
    "pickle": (pickle.dumps({"w": [1, 2]}), "Python pickle that torch.save did not write"),
    "numpy": (b"\x93NUMPY\x01\x00v\x00{'descr': '<f4'}", "NumPy .npy array"),
    "random": (bytes(range(7, 200)) * 3, "unrecognised binary file"),
    "damaged_pickle": (
        _torch_zip({"model": STATE}).replace(b"_rebuild_tensor_v2", b"_rebuild_tensor_XX"),
        "damaged or incomplete torch checkpoint",
    ),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_each_kind_of_broken_file_is_named_and_refused_without_a_trust_hint(name, tmp_path):
    content, looks_like = REFUSED[name]
    path = tmp_path / f"{name}.pth"
    path.write_bytes(content)
    with pytest.raises(TpasInputError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and looks_like in msg and "\n" not in msg
    assert "--trust-checkpoint" not in msg  # only a torch pickle refused for its objects gets that hint
    with pytest.raises(TpasInputError):  # trusting a broken file does not make it load
        load_checkpoint(path, trust=True)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_torch_pickle_refused_for_its_objects_suggests_trust_and_loads_with_it(legacy, tmp_path):
    path = tmp_path / "train.pth"
    torch.save({"model": STATE, "args": argparse.Namespace(lr=0.1)}, path, _use_new_zipfile_serialization=not legacy)
    assert sniff(path).kind == ("torch-legacy" if legacy else "torch-zip")
    with pytest.raises(TpasInputError, match=r"pickled Python objects \(argparse\.Namespace;.*--trust-checkpoint"):
        load_checkpoint(path)
    assert torch.equal(load_checkpoint(path, trust=True)["model"]["w"], STATE["w"])


def test_a_pickle_naming_a_missing_module_or_object_gets_no_trust_hint(tmp_path):
    path = tmp_path / "x.pth"
    data = _torch_zip({"args": argparse.Namespace(lr=0.1)})
    path.write_bytes(data.replace(b"argparse\nNamespace", b"nomodule\nNamespace"))
    with pytest.raises(TpasInputError, match=r"module that is not installed here \(nomodule\)") as err:
        load_checkpoint(path)
    path.write_bytes(data.replace(b"argparse\nNamespace", b"argparse\nNamespacX"))
    with pytest.raises(TpasInputError, match=r"names argparse\.NamespacX, which does not exist") as err2:
        load_checkpoint(path)
    assert "pass --trust-checkpoint" not in str(err.value) + str(err2.value)


def test_weight_formats_are_read_by_content_whatever_their_suffix(tmp_path):
    from safetensors.torch import save_file

    save_file(STATE, str(tmp_path / "weights.bin"))
    (tmp_path / "weights.pt").write_bytes(GOOD)
    torch.save(STATE, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert [sniff(tmp_path / f).kind for f in ("weights.bin", "weights.pt", "legacy.pt")] == [
        "safetensors", "torch-zip", "torch-legacy"
    ]  # fmt: skip
    assert torch.equal(load_checkpoint(tmp_path / "weights.bin")["w"], STATE["w"])
    assert torch.equal(load_checkpoint(tmp_path / "weights.pt")["model"]["b"], STATE["b"])
    assert torch.equal(load_checkpoint(tmp_path / "legacy.pt")["w"], STATE["w"])


def _cli(capsys, *args) -> tuple[int, str]:
    from tpas.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def _broken_folder(root: Path, family: str, weights: bytes) -> Path:
    """An HF (blip2) or open_clip (clip) folder whose config is fine and whose weight file is broken."""
    folder = root / f"{family}-folder"
    folder.mkdir()
    if family == "blip2":
        (folder / "config.json").write_text(
            json.dumps({"model_type": "blip-2", "qformer_config": {"use_qformer_text_input": True}})
        )
        (folder / "model.safetensors").write_bytes(weights)
    else:
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 16}}))
        (folder / "open_clip_model.safetensors").write_bytes(weights)
    return folder


BROKEN_FOR_CLI = {k: REFUSED[k] for k in ("empty", "html", "truncated_zip", "random", "damaged_pickle")}


@pytest.mark.parametrize("family", ["clip", "cmp", "beit3", "blip2"])
@pytest.mark.parametrize("name", sorted(BROKEN_FOR_CLI))
def test_tpas_infer_with_a_broken_checkpoint_prints_one_line_and_exits_2(family, name, tmp_path, capsys):
    content, looks_like = BROKEN_FOR_CLI[name]
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(content)
    targets = [ckpt] + ([_broken_folder(tmp_path, family, content)] if family in ("clip", "blip2") else [])
    for target in targets:
        code, err = _cli(capsys, "infer", family, "--checkpoint", target, "--images", tmp_path, "--queries",
                         tmp_path / "q.txt", "--out", tmp_path / "out.pt")  # fmt: skip
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, err
        # A real torch file given to blip2 (which loads folders) gets the conversion hint instead.
        expected = (
            "tpas convert blip2-lavis"
            if family == "blip2" and target == ckpt and name == "damaged_pickle"
            else looks_like
        )
        assert lines[0].startswith("error: ") and str(target) in lines[0] and expected in lines[0], lines[0]
        assert not (tmp_path / "out.pt").exists()


def test_a_transformers_folder_with_a_broken_weight_file_is_one_line(tmp_path, capsys):
    """The transformers-folder families (hf-dual, vlm, vlm-embed) share hf_folder.load_weights, which checks first."""
    from encoder_kit import write_hf_dual_folder

    folder = write_hf_dual_folder(tmp_path / "siglip", "siglip")
    good = (folder / "model.safetensors").read_bytes()
    capsys.readouterr()  # transformers' own chatter while the folder was written
    cases = {b"": "empty file (0 bytes)", b"<html></html>": "HTML page", good[:500]: "truncated safetensors file",
             good[:-100]: "weights do not load"}  # fmt: skip
    for content, looks_like in cases.items():
        (folder / "model.safetensors").write_bytes(content)
        code, err = _cli(capsys, "infer", "hf-dual", "--checkpoint", folder, "--images", tmp_path, "--queries",
                         tmp_path / "q.txt", "--out", tmp_path / "out.pt")  # fmt: skip
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and str(folder) in lines[0] and looks_like in lines[0], err
