"""Fuzz checkpoint loading for every family (clip, cmp, beit3, blip2) with broken files and broken state dicts.

Each family gets a tiny valid checkpoint (built here from the library's own modules, with its tokenizer beside it),
then two kinds of damage: bytes (the pickle inside the torch zip, or the safetensors header, mutated) and structure
(valid torch files whose state dict lost keys, changed shapes or dtypes, or holds non-tensors). Loading must give a
model or one TpasInputError naming the file.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from fuzzlib import fuzz_settings, mutate, valid_or_refused
from hypothesis import given
from hypothesis import strategies as st

from tpas.errors import TpasInputError
from tpas.models import load_model

TINY_CLIP = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}
WORDPIECE = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz"]

# Damaged pickles announce odd protocols; torch warns about each.
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")


@dataclass
class Kit:
    """One family's tiny valid checkpoint: the state dict, where its weights live, and how to load it."""

    family: str
    root: Path  # the folder holding the weights and the tokenizer
    state: dict[str, torch.Tensor]
    weights_name: str  # file name of the weights inside `root`
    folder: bool = False  # the family loads the folder (blip2), not the file
    options: dict[str, Any] = field(default_factory=dict)

    def target(self) -> Path:
        return self.root if self.folder else self.root / self.weights_name

    def load(self, _target: Path | None = None) -> Any:
        """The family's model from this kit's checkpoint (file or folder)."""
        return load_model(self.family, self.target(), **self.options)


def _clip(root: Path) -> Kit:
    from tpas.models.clip import build_open_clip

    torch.manual_seed(0)
    state = dict(build_open_clip(TINY_CLIP).state_dict())
    state |= {
        "input_resolution": torch.tensor(16),
        "context_length": torch.tensor(77),
        "vocab_size": torch.tensor(49408),
    }
    return Kit("clip", root, state, "clip.pt")


def _cmp(root: Path) -> Kit:
    from tpas.models.cmp import CMP, CMPConfig

    torch.manual_seed(0)
    state = {"model": CMP(CMPConfig.tiny()).state_dict()}
    words = [*WORDPIECE, *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz")]
    (root / "vocab.txt").write_text("\n".join(words + [f"[unused{i}]" for i in range(128 - len(words))]) + "\n")
    return Kit("cmp", root, state, "cmp.pth")


def _beit3(root: Path) -> Kit:
    import sentencepiece

    from tpas.models.beit3 import TOKENIZER_FILE, BEiT3Config, BEiT3Retrieval

    cfg = BEiT3Config(img_size=32, patch_size=16, embed_dim=64, layers=1, heads=1, ffn_dim=64, vocab_size=64,
                      max_source_positions=80)  # fmt: skip
    torch.manual_seed(0)
    with open(root / TOKENIZER_FILE, "wb") as fh:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter([f"a person {w} near the door" for w in ("walking", "running", "falling")] * 4),
            model_writer=fh, vocab_size=30, model_type="unigram", hard_vocab_limit=False, minloglevel=2,
        )  # fmt: skip
    return Kit("beit3", root, {"model": dict(BEiT3Retrieval(cfg).state_dict())}, "beit3.pth")


def _blip2(root: Path) -> Kit:
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 16}  # fmt: skip
    qformer = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
               "vocab_size": 40, "encoder_hidden_size": 32, "use_qformer_text_input": True,
               "max_position_embeddings": 64}  # fmt: skip
    cfg = Blip2Config(vision_config=vision, qformer_config=qformer, num_query_tokens=4, image_text_hidden_size=16)
    cfg.save_pretrained(root)
    (root / "vocab.txt").write_text("\n".join(WORDPIECE) + "\n")
    with torch.device("meta"):
        model = Blip2ForImageTextRetrieval(cfg)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
    # pytorch_model.bin, not safetensors: a torch file can hold the non-tensor values the structure fuzz writes.
    return Kit("blip2", root, state, "pytorch_model.bin", folder=True)


BUILDERS = {"clip": _clip, "cmp": _cmp, "beit3": _beit3, "blip2": _blip2}


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> dict[str, Kit]:
    """Every family's tiny checkpoint, saved valid once and checked to load (so the fuzzing starts from a good file)."""
    out = {}
    for family, build in BUILDERS.items():
        kit = build(tmp_path_factory.mktemp(family))
        torch.save(kit.state, kit.root / kit.weights_name)
        assert kit.load(kit.target()) is not None
        out[family] = kit
    return out


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _with_pickle(archive: bytes, pickled: bytes) -> bytes:
    """The torch zip `archive` with its data.pkl replaced (every other record kept), so torch reaches the unpickler."""
    src = zipfile.ZipFile(io.BytesIO(archive))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name in src.namelist():
            z.writestr(name, pickled if name.endswith("/data.pkl") else src.read(name))
    return out.getvalue()


def _data_pkl(archive: bytes) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(archive))
    return src.read(next(n for n in src.namelist() if n.endswith("/data.pkl")))


FAMILIES = sorted(BUILDERS)


@pytest.mark.parametrize("family", FAMILIES)
@fuzz_settings(40)
@given(data=st.data())
def test_damaged_checkpoint_bytes_give_a_model_or_one_line(family, data, kits):
    kit = kits[family]
    path = kit.root / kit.weights_name
    archive = path.read_bytes()
    damaged = data.draw(
        st.one_of(
            mutate(_data_pkl(archive)).map(lambda p: _with_pickle(archive, p)),  # the unpickler sees broken opcodes
            st.integers(0, len(archive) - 1).map(lambda n: archive[:n]),  # a download cut off
            mutate(archive[:4096]).map(lambda head: head + archive[4096:]),  # damaged zip headers
        )
    )
    try:
        path.write_bytes(damaged)
        valid_or_refused(kit.load, kit.target())
    finally:
        path.write_bytes(archive)


def _mutated_state(state: dict[str, Any]) -> st.SearchStrategy[Any]:
    """A state dict with some keys dropped, renamed, reshaped, retyped or replaced by non-tensors, maybe re-wrapped."""
    inner = state.get("model", state)
    keys = sorted(inner)

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        sd = dict(inner)
        for _ in range(draw(st.integers(1, 3))):
            key = draw(st.sampled_from(keys))
            op = draw(st.sampled_from(("drop", "rename", "reshape", "dtype", "scalar", "value", "extra")))
            t = sd[key] if isinstance(sd.get(key), torch.Tensor) else inner[key]
            if op == "drop":
                sd.pop(key, None)
            elif op == "rename":
                sd[key + draw(st.sampled_from((".x", "_", "0")))] = sd.pop(key, t)
            elif op == "reshape":
                shape = draw(st.lists(st.integers(0, 5), max_size=4))
                sd[key] = torch.zeros(shape)
            elif op == "dtype":
                sd[key] = t.to(draw(st.sampled_from((torch.int64, torch.bool, torch.float16, torch.uint8))))
            elif op == "scalar":
                sd[key] = torch.tensor(draw(st.integers(-3, 3)))
            elif op == "value":
                sd[key] = draw(st.sampled_from((None, 1, "x", [1, 2], {"a": 1})))
            else:
                sd[draw(st.sampled_from(("module.x", "logit_scale2", "", "7")))] = torch.zeros(2)
        wrap = draw(st.sampled_from(("none", "model", "state_dict", "module", "list")))
        return {"none": sd, "list": [sd]}.get(wrap, {wrap: sd})

    return build()


@pytest.mark.parametrize("family", FAMILIES)
@fuzz_settings(40)
@given(data=st.data())
def test_broken_state_dicts_give_a_model_or_one_line(family, data, kits):
    kit = kits[family]
    path = kit.root / kit.weights_name
    good = path.read_bytes()
    try:
        path.write_bytes(_torch_bytes(data.draw(_mutated_state(kit.state))))
        valid_or_refused(kit.load, kit.target())
    finally:
        path.write_bytes(good)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_pickle_with_a_foreign_global_suggests_trust_only_then(family, kits):
    """The one case where --trust-checkpoint is the fix: a real torch pickle refused for the objects it holds."""
    import argparse

    kit = kits[family]
    path = kit.root / kit.weights_name
    good = path.read_bytes()
    try:
        path.write_bytes(_torch_bytes({"model": kit.state.get("model", kit.state), "args": argparse.Namespace(a=1)}))
        with pytest.raises(TpasInputError, match="--trust-checkpoint") as err:
            kit.load(path)
        assert str(path) in str(err.value) and "argparse.Namespace" in str(err.value)
        path.write_bytes(_with_pickle(good, _data_pkl(good)[:-5]))
        with pytest.raises(TpasInputError, match="damaged") as err:
            kit.load(path)
        assert "--trust-checkpoint" not in str(err.value)
    finally:
        path.write_bytes(good)


def test_a_broken_blip2_shard_index_is_refused(kits):
    """A shard index whose weight_map is not {name: file in this folder} gets one line, never a traceback."""
    kit = kits["blip2"]
    index = kit.root / "pytorch_model.bin.index.json"
    try:
        for weight_map in ([1], {"a": 1}, {"a": ["x"]}, {}, {"a": "../x.bin"}, {"a": "missing.bin"}, "x"):
            index.write_text(json.dumps({"weight_map": weight_map}))
            assert valid_or_refused(kit.load, kit.root) is None
    finally:
        index.unlink()
