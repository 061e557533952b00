"""`infer --keep-top K --rerank-k k` equals the dense re-rank on the kept cells; `--dtype fp16`; exact X-VLM fill.

The toy families of test_engine.py: ToyMatchModel's final matrix is the filled re-rank matrix itself, GlobalToy's
normalises over the whole matrix (as CMP's does), so a top-K run must reproduce global minima and maxima.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest
import torch

from tests.models.test_engine import GlobalToy, ToyMatchModel
from tpas.errors import TpasInputError
from tpas.models.cmp import cmp_final_scores
from tpas.models.engine import infer, itc_path_for, itm_path_for
from tpas.models.rerank import final_on_kept
from tpas.models.xvlm import xvlm_fill
from tpas.ranking import topk_stable
from tpas.sims import SimsMatrix

if TYPE_CHECKING:
    from tests.models.conftest import TinyGallery


def _three(out: Path) -> tuple[SimsMatrix, SimsMatrix, SimsMatrix]:
    return SimsMatrix.load(out), SimsMatrix.load(itc_path_for(out)), SimsMatrix.load(itm_path_for(out))


@pytest.mark.parametrize("family", [ToyMatchModel, GlobalToy])
def test_keep_top_rerank_equals_the_dense_rerank(tiny_gallery: TinyGallery, tmp_path: Path, family: type) -> None:
    kw = {"batch_size": 3, "num_workers": 0, "cache_dir": tmp_path / "cache", "rerank_k": 3}
    infer(family(), tiny_gallery.images, tiny_gallery.queries, tmp_path / "dense.pt", **kw)
    got = infer(family(), tiny_gallery.images, tiny_gallery.queries, tmp_path / "top.pt", keep_top=5, **kw)
    (d_res, d_itc, d_itm), (t_res, t_itc, t_itm) = _three(tmp_path / "dense.pt"), _three(tmp_path / "top.pt")
    want = d_itc.top_k(5)
    assert t_itc.k == 5 and torch.equal(t_itc.indices, want.indices) and torch.equal(t_itc.values, want.values)
    assert torch.equal(t_itm.indices, d_itm.indices) and torch.equal(t_itm.values, d_itm.values)
    # The final matrix on the kept cells: the dense run's values there, bit for bit (global min-max included).
    assert t_res.k == 5 and torch.equal(t_res.indices, want.indices)
    assert torch.equal(t_res.values, d_res.scores.gather(1, want.indices))
    assert torch.equal(got.values, t_res.values)
    assert t_res.meta["keep_top"] == 5 and t_res.meta["rerank_k"] == 3 and t_itc.meta["keep_top"] == 5


def test_keep_top_rerank_refuses_k_above_K_and_candidates(tiny_gallery: TinyGallery, tmp_path: Path) -> None:
    args = (ToyMatchModel(), tiny_gallery.images, tiny_gallery.queries, tmp_path / "x.pt")
    with pytest.raises(TpasInputError, match="--rerank-k 4 re-ranks from the kept top-3: it must be <= --keep-top"):
        infer(*args, keep_top=3, rerank_k=4, num_workers=0)
    with pytest.raises(TpasInputError, match="--candidates needs the dense path"):
        infer(*args, keep_top=3, rerank_k=2, candidates=tmp_path / "c.pt", num_workers=0)
    assert not (tmp_path / "x.pt").exists()


def test_cli_keep_top_rerank_and_fp16_files(tiny_gallery: TinyGallery, tmp_path: Path, cli,
                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from tpas.models import base

    class CliToy(GlobalToy):
        @classmethod
        def from_checkpoint(cls, path, config=None, **options):
            return cls()

    base.list_models()  # the real families first, then the toy one for this test only
    monkeypatch.setitem(base._REGISTRY, "toy", CliToy)
    dense = infer(CliToy(), tiny_gallery.images, tiny_gallery.queries, tmp_path / "d.pt", rerank_k=2, num_workers=0,
                  use_cache=False)  # fmt: skip
    common = ["infer", "toy", "--images", tiny_gallery.images, "--queries", tiny_gallery.queries, "--workers", "0",
              "--no-cache", "--rerank-k", "2", "--keep-top", "4"]  # fmt: skip
    code, _, err = cli(*common, "--out", tmp_path / "t.pt")
    assert code == 0, err
    res, itc, itm = _three(tmp_path / "t.pt")
    want = SimsMatrix.load(itc_path_for(tmp_path / "d.pt")).top_k(4)
    assert torch.equal(itc.indices, want.indices) and torch.equal(itc.values, want.values)
    assert torch.equal(itm.values, SimsMatrix.load(itm_path_for(tmp_path / "d.pt")).values)
    assert torch.equal(res.values, dense.scores.gather(1, want.indices))
    code, _, err = cli(*common, "--out", tmp_path / "h.pt", "--dtype", "fp16")
    assert code == 0, err
    for half, full in zip(_three(tmp_path / "h.pt"), (res, itc, itm), strict=True):
        assert half.values.dtype == torch.float16 and half.meta["dtype"] == "fp16" and "dtype" not in full.meta
        assert torch.equal(half.indices, full.indices) and torch.equal(half.values, full.values.half())
    code, _, err = cli(*common, "--out", tmp_path / "b.pt", "--dtype", "bf16")
    assert code == 2 and "--dtype must be one of fp32, fp16, got 'bf16'" in err and not (tmp_path / "b.pt").exists()


def test_dense_fp16_files(tiny_gallery: TinyGallery, tmp_path: Path) -> None:
    kw = {"num_workers": 0, "cache_dir": tmp_path / "cache"}
    full = infer(ToyMatchModel(), tiny_gallery.images, tiny_gallery.queries, tmp_path / "f.pt", **kw)
    half = infer(ToyMatchModel(), tiny_gallery.images, tiny_gallery.queries, tmp_path / "h.pt", dtype="fp16", **kw)
    assert torch.equal(half.scores, full.scores)  # the returned matrix keeps float32; the file holds float16
    loaded = SimsMatrix.load(tmp_path / "h.pt")
    assert loaded.scores.dtype == torch.float16 and loaded.meta["dtype"] == "fp16"
    assert torch.equal(loaded.scores, full.scores.half())


def test_final_on_kept_reproduces_global_and_per_row_rules_exactly() -> None:
    # CMP/APTM's global min-max and X-VLM's -100 fill, dense vs the compact top-K form, on random ties-free scores.
    gen = torch.Generator().manual_seed(0)
    q, g, big_k, k = 6, 40, 7, 3
    itc = torch.randn(q, g, generator=gen)
    matched = torch.randn(q, k, generator=gen) * 3
    top = topk_stable(itc, big_k)
    filled = matched.min(dim=1, keepdim=True).values.expand(q, g).clone().scatter_(1, top[:, :k], matched)
    for rule in (lambda r, i, t: cmp_final_scores(r, i), lambda r, i, t: xvlm_fill(r, i, top=t)):
        family = SimpleNamespace(finalize_rerank=rule)
        dense = rule(filled, itc, top[:, :k])
        kept = final_on_kept(family, itc.gather(1, top), float(itc.min()), matched)
        assert torch.equal(kept, dense.gather(1, top))


def test_xvlm_fill_with_the_reranked_columns_is_exact_where_the_guess_is_not() -> None:
    # Row 0: two of the top-3 logits tie at the row minimum (-1.0 at columns 0 and 2): without `top` the guess keeps
    # only the higher-ITC one; with it, both scored cells keep their logit and the unscored -1.0 cell becomes -100.
    itc = torch.tensor([[0.9, 0.1, 0.5, 0.7, 0.2]])
    filled = torch.tensor([[-1.0, -1.0, -1.0, 5.0, -1.0]])
    top = torch.tensor([[0, 3, 2]])
    assert xvlm_fill(filled, itc, top=top).tolist() == [[-1.0, -100.0, -1.0, 5.0, -100.0]]
    assert xvlm_fill(filled, itc).tolist() == [[-1.0, -100.0, -100.0, 5.0, -100.0]]
