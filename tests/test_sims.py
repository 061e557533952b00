"""SimsMatrix: dense and top-K forms, validation, align/select by id, safe load, atomic save, legacy import."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch

import tpas.sims as sims_mod
from tpas.errors import TpasInputError
from tpas.sims import FORMAT, FORMAT_V1, SimsMatrix, pack_ids, unpack_ids


def dense(q: int = 3, g: int = 5, seed: int = 0) -> SimsMatrix:
    gen = torch.Generator().manual_seed(seed)
    return SimsMatrix([f"q{i}" for i in range(q)], [f"g{j}" for j in range(g)],
                      scores=torch.rand(q, g, generator=gen), source="test")  # fmt: skip


# ------------------------------------------------------------------------------------------------ validation
def test_ids_are_strings_and_repr():
    m = SimsMatrix([1, "0012"], ["a", 7], scores=torch.zeros(2, 2))
    assert m.query_ids == ["1", "0012"] and m.gallery_ids == ["a", "7"]
    assert m.shape == (2, 2) and m.is_dense and m.k is None
    assert "2 queries x 2 gallery, dense" in repr(m)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scores": torch.zeros(2, 3)}, r"scores have shape \(2, 3\) but there are 2 query ids and 2 gallery ids"),
        ({"scores": torch.zeros(2, 2, dtype=torch.long)}, "2-D floating-point"),
        ({"scores": torch.tensor([[0.0, float("inf")], [0.0, 0.0]])}, "score inf at query 'a', gallery id 'y'"),
        ({"scores": torch.tensor([[0.0, 0.0], [float("nan"), 0.0]])}, "score nan at query 'b', gallery id 'x'"),
        ({}, "needs scores, or indices and values"),
        ({"indices": torch.tensor([[0], [2]]), "values": torch.zeros(2, 1)}, r"indices must lie in \[0, 2\)"),
        ({"indices": torch.tensor([[0, 0], [0, 1]]), "values": torch.zeros(2, 2)}, "'a' lists a gallery column twice"),
        ({"indices": torch.zeros(2, 1), "values": torch.zeros(2, 1)}, "indices must be an integer tensor"),
        ({"indices": torch.zeros(1, 1, dtype=torch.long), "values": torch.zeros(1, 1)}, "top-K matrix has 1 rows"),
        ({"scores": torch.zeros(2, 2), "indices": torch.zeros(2, 1, dtype=torch.long), "values": torch.zeros(2, 1)},
         "either dense"),
    ],
)  # fmt: skip
def test_invalid_matrices_are_refused(kwargs, message):
    with pytest.raises(TpasInputError, match=message):
        SimsMatrix(["a", "b"], ["x", "y"], **kwargs)


def test_duplicate_ids_are_refused():
    with pytest.raises(TpasInputError, match=r"duplicate query id 'a'"):
        SimsMatrix(["a", "a"], ["x"], scores=torch.zeros(2, 1))
    with pytest.raises(TpasInputError, match=r"duplicate gallery id 'x'"):
        SimsMatrix(["a"], ["x", "x"], scores=torch.zeros(1, 2))


def test_meta_must_be_plain():
    for bad in ({"t": torch.zeros(1)}, {"o": object()}, {1: "int key"}, {"nested": [{"x": {1, 2}}]}):
        with pytest.raises(TypeError):
            SimsMatrix(["a"], ["x"], scores=torch.zeros(1, 1), meta=bad)
    SimsMatrix(["a"], ["x"], scores=torch.zeros(1, 1), meta={"a": [1, 2.5, None, True, {"b": "c"}]})


# ------------------------------------------------------------------------------------------------ top-K
def test_top_k_follows_stable_order_and_round_trips_to_dense():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    m = SimsMatrix(["a", "b"], list("vwxyz"), scores=scores)
    t = m.top_k(3)
    assert t.indices.tolist() == [[1, 2, 4], [0, 1, 2]]
    assert t.values.tolist() == [[3.0, 3.0, 3.0], [2.0, 2.0, 2.0]]
    assert "top-3" in repr(t) and t.k == 3
    filled = t.to_dense()  # unscored cells get the row minimum of the kept cells
    assert filled.tolist() == [[3.0, 3.0, 3.0, 3.0, 3.0], [2.0] * 5]
    assert t.to_dense(fill=-1.0)[0].tolist() == [-1.0, 3.0, 3.0, -1.0, 3.0]
    assert t.top_k(2).indices.tolist() == [[1, 2], [0, 1]]
    with pytest.raises(ValueError, match=r"cannot keep 4 cells"):
        t.top_k(4)


def test_top_k_of_top_k_breaks_ties_by_gallery_not_storage_order():
    t = SimsMatrix(["a"], list("vwxyz"), indices=torch.tensor([[4, 0, 2]]), values=torch.tensor([[1.0, 1.0, 1.0]]))
    assert t.top_k(2).indices.tolist() == [[0, 2]]


# ------------------------------------------------------------------------------------------------ align / select
def test_value_range_is_cached_until_the_scores_change():
    m = SimsMatrix(["a", "b"], ["x", "y"], scores=torch.tensor([[1.0, 2.0], [3.0, -4.0]]))
    assert [float(v) for v in m.value_range()] == [-4.0, 3.0]
    assert m.value_range()[0] is m.value_range()[0]  # the validation's pass, reused
    m.scores[0, 0] = 9.0  # in place
    assert [float(v) for v in m.value_range()] == [-4.0, 9.0]
    m.scores = torch.tensor([[0.5, 0.25], [0.0, 1.0]])  # replaced
    assert [float(v) for v in m.value_range()] == [0.0, 1.0]
    back = pickle.loads(pickle.dumps(m))
    assert [float(v) for v in back.value_range()] == [0.0, 1.0]
    t = SimsMatrix(["a"], ["x", "y", "z"], indices=torch.tensor([[2, 0]]), values=torch.tensor([[0.5, -1.0]]))
    assert [float(v) for v in t.value_range()] == [-1.0, 0.5]


def test_align_reorders_by_id_and_names_differences():
    m = dense()
    other = SimsMatrix(["q2", "q0", "q1"], ["g4", "g3", "g2", "g1", "g0"], scores=torch.zeros(3, 5))
    a = m.align(other)
    assert a.query_ids == other.query_ids and a.gallery_ids == other.gallery_ids
    assert a.scores[0, 0] == m.scores[2, 4]
    assert m.align(m) is m
    bad = SimsMatrix(["q0", "q1", "qX"], m.gallery_ids, scores=torch.zeros(3, 5))
    with pytest.raises(TpasInputError, match=r"query ids differ \(only in the first: 'q2'; only in the second: 'qX'\)"):
        m.align(bad)
    with pytest.raises(TpasInputError, match=r"gallery ids differ"):
        m.align(gallery_ids=["g0", "g1"])


def test_select_subsets_and_unknown_ids():
    m = dense()
    s = m.select(["q1"], ["g3", "g0"])
    assert s.scores.tolist() == [[m.scores[1, 3].item(), m.scores[1, 0].item()]]
    with pytest.raises(TpasInputError, match=r"query id 'nope' is not in the matrix"):
        m.select(["nope"])
    with pytest.raises(TpasInputError, match=r"gallery id 'gz' is not in the matrix"):
        m.select(gallery_ids=["gz"])


def test_select_on_top_k_reorders_gallery_but_cannot_drop_kept_columns():
    t = dense().top_k(2)
    r = t.select(gallery_ids=list(reversed(t.gallery_ids)))
    assert torch.equal(r.to_dense(fill=0.0), t.to_dense(fill=0.0).flip(1))
    with pytest.raises(TpasInputError, match=r"cannot drop gallery ids from a top-K matrix"):
        t.select(gallery_ids=["g0"])


# ------------------------------------------------------------------------------------------------ files
def test_save_load_round_trip_dense_and_top_k(tmp_path):
    m = SimsMatrix(["0012", "100018684969009"], ["a", "b", "c"], scores=torch.rand(2, 3), source="clip",
                   meta={"checkpoint_sha256": "ab"})  # fmt: skip
    back = SimsMatrix.load(m.save(tmp_path / "m.pt"))
    assert back.query_ids == ["0012", "100018684969009"] and torch.equal(back.scores, m.scores)
    assert back.source == "clip" and back.meta["checkpoint_sha256"] == "ab"
    assert {"tool_version", "created_at"} <= set(back.meta)
    t = SimsMatrix.load(m.top_k(2).save(tmp_path / "t.pt"))
    assert torch.equal(t.indices, m.top_k(2).indices) and t.scores is None


def test_v2_file_packs_ids_into_tensors_and_round_trips_any_unicode(tmp_path):
    qids = ["0012", "é:0", "日本", ""]
    m = SimsMatrix(qids, ["a", "b\x00c", "ß"], scores=torch.rand(4, 3))
    raw = torch.load(m.save(tmp_path / "m.pt"), weights_only=True)
    assert raw["format"] == FORMAT == "tpas-sims/2"
    assert raw["query_ids"]["utf8"].dtype == torch.uint8 and raw["query_ids"]["offsets"].tolist() == [0, 4, 8, 14, 14]
    back = SimsMatrix.load(tmp_path / "m.pt")
    assert back.query_ids == qids and back.gallery_ids == ["a", "b\x00c", "ß"]
    assert unpack_ids(pack_ids([])) == []


def test_v1_files_still_load_dense_and_top_k(tmp_path):
    scores = torch.rand(2, 3)
    torch.save({"format": FORMAT_V1, "query_ids": ["a", "b"], "gallery_ids": ["x", "y", "z"], "scores": scores,
                "source": "old", "meta": {"k": 1}}, tmp_path / "v1.pt")  # fmt: skip
    m = SimsMatrix.load(tmp_path / "v1.pt")
    assert m.query_ids == ["a", "b"] and torch.equal(m.scores, scores) and m.source == "old" and m.meta == {"k": 1}
    torch.save({"format": FORMAT_V1, "query_ids": ["a"], "gallery_ids": ["x", "y"], "indices": torch.tensor([[1]]),
                "values": torch.tensor([[0.5]]), "source": "", "meta": {}}, tmp_path / "v1k.pt")  # fmt: skip
    t = SimsMatrix.load(tmp_path / "v1k.pt")
    assert t.k == 1 and t.indices.tolist() == [[1]]
    # torch's pre-1.6 (non-zip) serialization cannot be memory-mapped: read normally
    old = {"format": FORMAT_V1, "query_ids": ["a"], "gallery_ids": ["x"], "scores": torch.ones(1, 1), "source": ""}
    torch.save(old, tmp_path / "legacy_zip.pt", _use_new_zipfile_serialization=False)
    assert SimsMatrix.load(tmp_path / "legacy_zip.pt").scores.tolist() == [[1.0]]


def test_load_memory_maps_the_file(tmp_path, monkeypatch):
    path = dense().save(tmp_path / "m.pt")
    seen = []
    real = torch.load
    monkeypatch.setattr(sims_mod.torch, "load", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    SimsMatrix.load(path)
    assert seen[0]["mmap"] is True and seen[0]["weights_only"] is True


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ({"utf8": torch.tensor([97], dtype=torch.uint8)}, "list of str or"),
        ({"utf8": torch.tensor([97.0]), "offsets": torch.tensor([0, 1])}, "utf8 must be a 1-D uint8"),
        ({"utf8": torch.tensor([97], dtype=torch.uint8), "offsets": torch.tensor([0, 1], dtype=torch.int32)},
         "offsets must be a 1-D int64"),
        ({"utf8": torch.tensor([97, 98], dtype=torch.uint8), "offsets": torch.tensor([0, 3])}, "rise from 0 to"),
        ({"utf8": torch.tensor([97, 98], dtype=torch.uint8), "offsets": torch.tensor([0, 2, 1, 2])}, "rise from 0"),
        ({"utf8": torch.tensor([255], dtype=torch.uint8), "offsets": torch.tensor([0, 1])}, "not valid UTF-8"),
        ({"utf8": torch.tensor([195, 169], dtype=torch.uint8), "offsets": torch.tensor([0, 1, 2])}, "not valid UTF-8"),
    ],
)  # fmt: skip
def test_malformed_packed_ids_are_refused(tmp_path, ids, message):
    n = 2 if len(ids.get("offsets", [0, 0])) == 3 else 1
    torch.save({"format": FORMAT, "query_ids": ids, "gallery_ids": pack_ids(["x"]), "scores": torch.zeros(n, 1),
                "source": "", "meta": {}}, tmp_path / "bad.pt")  # fmt: skip
    with pytest.raises(TpasInputError, match=rf"bad.pt: malformed tpas-sims/2 file \(query_ids.*{message}"):
        SimsMatrix.load(tmp_path / "bad.pt")


def test_fp16_storage_halves_the_file_and_its_ties_keep_gallery_order(tmp_path):
    # 0.3 and 0.30001 are distinct in float32 and equal in float16: the tie then goes to the lower gallery column.
    scores = torch.tensor([[0.3, 0.30001, 0.1], [0.2, 0.7, 0.70002]])
    m = SimsMatrix(["a", "b"], ["x", "y", "z"], scores=scores)
    assert m.top_k(1).indices.tolist() == [[1], [2]]
    half = SimsMatrix.load(m.save(tmp_path / "h.pt", dtype="fp16"))
    assert half.scores.dtype == torch.float16 and half.scores[0, 0] == half.scores[0, 1]
    assert half.top_k(1).indices.tolist() == [[0], [1]]
    big = SimsMatrix([str(i) for i in range(64)], [str(i) for i in range(4096)], scores=torch.rand(64, 4096))
    size32 = big.save(tmp_path / "f32.pt").stat().st_size
    assert big.save(tmp_path / "f16.pt", dtype=torch.float16).stat().st_size < 0.6 * size32
    t = SimsMatrix.load(m.top_k(2).save(tmp_path / "t16.pt", dtype="fp16"))
    assert t.values.dtype == torch.float16 and t.indices.dtype == torch.long
    with pytest.raises(TpasInputError, match=r"beyond \+-65504 cannot be stored as fp16"):
        SimsMatrix(["a"], ["x"], scores=torch.tensor([[1e5]])).save(tmp_path / "over.pt", dtype="fp16")
    with pytest.raises(ValueError, match=r"one of \['fp32', 'fp16'\]"):
        m.save(tmp_path / "x.pt", dtype="int8")
    assert not (tmp_path / "over.pt").exists() and not (tmp_path / "x.pt").exists()


def test_saved_slice_does_not_carry_the_parent_storage(tmp_path):
    big = torch.rand(200, 500)
    m = SimsMatrix(["a"], [str(i) for i in range(500)], scores=big[:1])
    path = m.save(tmp_path / "slice.pt")
    assert path.stat().st_size < big.numel() * 4 / 10


def test_atomic_save_leaves_previous_file_and_no_temp_on_failure(tmp_path, monkeypatch):
    m = dense()
    path = m.save(tmp_path / "m.pt")
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")  # SimsMatrix.save hands torch.save an open file (see sims.torch_save)
        raise OSError("disk full")

    monkeypatch.setattr(sims_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match=r"disk full"):
        dense(seed=1).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


class _Marker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_load_refuses_pickled_objects_without_running_them(tmp_path):
    marker = tmp_path / "EXECUTED"
    torch.save({"format": FORMAT, "meta": _Marker(marker)}, tmp_path / "evil.pt")
    with pytest.raises(TpasInputError, match=r"evil.pt: holds pickled Python objects \(io.open\)"):
        SimsMatrix.load(tmp_path / "evil.pt")
    with pytest.raises(TpasInputError, match=r"pickled Python objects"):
        SimsMatrix.from_legacy(tmp_path / "evil.pt", ["a"], ["x"])
    assert not marker.exists()


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(TpasInputError, match=r"missing.pt: file not found"):
        SimsMatrix.load(tmp_path / "missing.pt")
    torch.save(torch.zeros(2, 2), tmp_path / "bare.pt")
    with pytest.raises(TpasInputError, match=r"bare.pt: is a bare tensor without ids.*import-legacy"):
        SimsMatrix.load(tmp_path / "bare.pt")
    torch.save({"scores": torch.zeros(1, 1)}, tmp_path / "foreign.pt")
    with pytest.raises(TpasInputError, match=rf"foreign.pt: is not a {FORMAT} file"):
        SimsMatrix.load(tmp_path / "foreign.pt")
    torch.save({"format": FORMAT, "scores": torch.zeros(1, 1)}, tmp_path / "noids.pt")
    with pytest.raises(TpasInputError, match=r"noids.pt: malformed"):
        SimsMatrix.load(tmp_path / "noids.pt")
    torch.save({"format": FORMAT, "query_ids": ["a"], "gallery_ids": ["x"], "scores": torch.zeros(1, 1),
                "meta": "not a dict"}, tmp_path / "meta.pt")  # fmt: skip
    with pytest.raises(TpasInputError, match=r"meta.pt: malformed.*meta must be a dict"):
        SimsMatrix.load(tmp_path / "meta.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00not a torch file at all")
    with pytest.raises(TpasInputError, match=r"junk.pt: cannot be read as a torch file"):
        SimsMatrix.load(tmp_path / "junk.pt")
    # A zip64 locator claiming two disks: zipfile.is_zipfile itself raises on it (found by the fuzz test).
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, 0, 2)
    (tmp_path / "disks.pt").write_bytes(locator + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0, 0, 0, 0, 0))
    with pytest.raises(TpasInputError, match=r"disks.pt: cannot be read as a torch file \(damaged zip archive"):
        SimsMatrix.load(tmp_path / "disks.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(TpasInputError, match=r"empty.pt: cannot be read as a torch file"):
        SimsMatrix.load(tmp_path / "empty.pt")
    torch.save({"format": FORMAT, "query_ids": ["a", "a"], "gallery_ids": ["x"], "scores": torch.zeros(2, 1),
                "source": "", "meta": {}}, tmp_path / "dup.pt")  # fmt: skip
    with pytest.raises(TpasInputError, match=r"dup.pt: duplicate query id 'a'"):
        SimsMatrix.load(tmp_path / "dup.pt")


# ------------------------------------------------------------------------------------------------ legacy
def test_from_legacy_tensor_array_and_files(tmp_path):
    s = torch.rand(2, 3)
    m = SimsMatrix.from_legacy(s, ["a", "b"], ["x", "y", "z"])
    assert torch.equal(m.scores, s) and m.source == "legacy"
    assert torch.equal(SimsMatrix.from_legacy(s.T.numpy(), ["a", "b"], ["x", "y", "z"], transpose=True).scores, s)
    torch.save(s.double(), tmp_path / "l.pt")
    assert torch.equal(SimsMatrix.from_legacy(tmp_path / "l.pt", ["a", "b"], ["x", "y", "z"]).scores, s)
    np.save(tmp_path / "l.npy", s.numpy())
    m = SimsMatrix.from_legacy(tmp_path / "l.npy", ["a", "b"], ["x", "y", "z"])
    assert torch.equal(m.scores, s) and m.meta["imported_from"].endswith("l.npy")


def test_from_legacy_errors(tmp_path):
    with pytest.raises(TpasInputError, match=r"scores have shape \(2, 3\) but there are 3 query ids"):
        SimsMatrix.from_legacy(torch.zeros(2, 3), ["a", "b", "c"], ["x", "y", "z"])
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(TpasInputError, match=r"obj.npy: not a plain numeric .npy array"):
        SimsMatrix.from_legacy(tmp_path / "obj.npy", ["a"], ["x"])
    torch.save({"sims": torch.zeros(1, 1)}, tmp_path / "dict.pt")
    with pytest.raises(TpasInputError, match=r"dict.pt: expected a bare score tensor, found dict"):
        SimsMatrix.from_legacy(tmp_path / "dict.pt", ["a"], ["x"])
    with pytest.raises(TpasInputError, match=r"file not found"):
        SimsMatrix.from_legacy(tmp_path / "none.npy", ["a"], ["x"])
