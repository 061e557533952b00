"""`tpas train xvlm` on a synthetic mini-PAB: the losses are X-VLM's, a tiny model learns, resumes bit-for-bit, writes
checkpoints that `tpas infer xvlm` loads strictly, starts from a retrieval checkpoint or the pre-training, trains on a
subset list file, and runs under torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_distributed import torchrun

from tpas.data.pab import read_train_annotation
from tpas.data.synthetic import MiniPab, generate_mini_pab
from tpas.errors import TpasInputError
from tpas.models.xvlm import XVLM, XVLMConfig
from tpas.train.checkpoints import BEST, LAST
from tpas.train.config import XVLM_DEFAULTS, load_train_config
from tpas.train.data import select_pairs
from tpas.train.kinds import get_kind
from tpas.train.losses import compute_losses, sample_negatives
from tpas.train.model_setup import build_xvlm
from tpas.train.trainer import train

HERE = Path(__file__).resolve().parent
TINY_YAML = HERE / "xvlm_tiny.yaml"


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> MiniPab:
    return generate_mini_pab(tmp_path_factory.mktemp("pab") / "mini", seed=0, n_identities=60, n_val_identities=2,
                             n_test_identities=20, n_distractors=0, image_size=(32, 64))  # fmt: skip


def sets(mini: MiniPab, out: Path, *more: str) -> list[str]:
    return [f"data.root={mini.root}", f"data.vocab={mini.vocab}", f"output.dir={out}", *more]


def tiny_cfg(mini: MiniPab, out: Path, *more: str) -> dict:
    return load_train_config(TINY_YAML, sets(mini, out, *more), kind="xvlm")


def set_args(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def test_the_preset_is_x_vlm_retrieval_fine_tuning() -> None:
    cfg = load_train_config("xvlm_hfut", kind="xvlm")
    for section in ("augment", "loss", "optim", "train", "eval"):
        assert cfg[section] == {**XVLM_DEFAULTS[section], **cfg[section]}, section
        assert cfg[section].keys() == XVLM_DEFAULTS[section].keys(), section
    optim, aug = cfg["optim"], cfg["augment"]
    assert (optim["lr"], optim["schedule"], optim["warmup_steps"], optim["new_param_patterns"]) == (
        3e-5,
        "linear",
        0.1,
        [],
    )
    assert (cfg["train"]["epochs"], cfg["train"]["batch_size"], cfg["eval"]["rerank_k"]) == (10, 20, 128)
    assert (aug["crop_scale"], aug["randaug_n"], aug["random_erasing"], aug["eda"]) == ([0.5, 1.0], 2, 0.0, False)
    assert cfg["loss"]["itc_label_smoothing"] == 0.0
    # CMP-only settings do not exist for X-VLM: setting one is an error naming it.
    for key in ("masking.mask_prob=0.1", "data.pose=true", "loss.ihnm=true", "init.swin=x.pth"):
        with pytest.raises(TpasInputError, match=key.split("=")[0]):
            load_train_config("xvlm_hfut", [key], kind="xvlm")
    with pytest.raises(TpasInputError, match="not those of a xvlm training config"):
        train(load_train_config("cmp_tiny"), kind="xvlm")


def test_the_preset_model_has_the_released_retrieval_layout() -> None:
    """`model.preset: base` with the 30,522-token vocab is X-VLM's retrieval model key for key (the layout fixture)."""
    from tpas.train.model_setup import build_xvlm_config

    ref = json.loads((HERE.parent / "fixtures" / "xvlm_retrieval_layout.json").read_text())
    cfg = build_xvlm_config(load_train_config("xvlm_hfut", kind="xvlm")["model"], vocab_size=30522)
    assert cfg == XVLMConfig.for_family("xvlm")
    with torch.device("meta"):
        model = XVLM(cfg, init=False)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == {k: s for k, (s, _) in ref["keys"].items()}


def test_losses_are_x_vlm_itc_and_itm_over_in_batch_hard_negatives() -> None:
    """ITC: identity-aware targets over all pairs, no smoothing; ITM: B positives + 2B sampled negatives, one mean."""
    torch.manual_seed(0)
    model = XVLM(XVLMConfig.tiny("xvlm", vocab_size=60))
    b = 6
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 60, (b, 12), generator=g)
    ids[:, 0] = 2
    batch = {"image": torch.randn(b, 3, 64, 64, generator=g), "text_ids": ids,
             "text_mask": torch.ones(b, 12, dtype=torch.long), "idx": torch.tensor([0, 0, 1, 2, 3, 4])}  # fmt: skip
    loss_cfg = get_kind("xvlm").loss_config(XVLM_DEFAULTS["loss"])
    model.eval()  # no dropout: the reference below recomputes the same forward
    torch.manual_seed(5)
    got = compute_losses(model, batch, loss_cfg)
    assert set(got) >= {"total", "itc", "itm"} and "mlm" not in got
    with torch.no_grad():
        tokens = model.encode_image_tokens(batch["image"])
        states = model.encode_text_tokens(ids, batch["text_mask"])
        img, txt = model.image_feat(tokens), model.text_feat(states)
        logits = img @ txt.T / model.temp
        pos = (batch["idx"].view(-1, 1) == batch["idx"].view(1, -1)).float()
        targets = pos / pos.sum(1, keepdim=True)
        i2t = -(F.log_softmax(logits, 1) * targets).sum(1).mean()
        t2i = -(F.log_softmax(logits.T, 1) * targets).sum(1).mean()
        itc = (i2t + t2i) / 2
        torch.manual_seed(5)
        neg_img, _, neg_txt, _ = sample_negatives(img, txt, batch["idx"], model.temp)
        mask = batch["text_mask"]
        cls = torch.cat([model.cross_cls(states, mask, tokens), model.cross_cls(states, mask, tokens[neg_img]),
                         model.cross_cls(states[neg_txt], mask, tokens)])  # fmt: skip
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long()
        itm = F.cross_entropy(model.itm_logits(cls), labels)
    got = {k: float(v.detach()) for k, v in got.items()}
    assert got["itc"] == pytest.approx(float(itc), rel=1e-5)
    assert got["itm"] == pytest.approx(float(itm), rel=1e-5)
    assert got["total"] == pytest.approx(float(itc + itm), rel=1e-5)
    assert (neg_img != torch.arange(b)).all() and batch["idx"][neg_txt[0]] != 0  # never the anchor's own identity


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    from tpas.train.model_setup import enable_gradient_checkpointing

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 60, (4, 10), generator=g)
    batch = {"image": torch.randn(4, 3, 64, 64, generator=g), "text_ids": ids,
             "text_mask": torch.ones(4, 10, dtype=torch.long), "idx": torch.arange(4)}  # fmt: skip
    loss_cfg = get_kind("xvlm").loss_config(XVLM_DEFAULTS["loss"])
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(1)
        model = XVLM(XVLMConfig.tiny("xvlm", vocab_size=60))
        if ckpt:
            assert enable_gradient_checkpointing(model) > 0  # the Swin blocks and BERT layers CMP shares
        torch.manual_seed(3)  # same dropout masks and negatives
        compute_losses(model, batch, loss_cfg)["total"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, atol=1e-6), name


def test_training_lowers_the_loss_and_the_checkpoint_runs_through_infer_xvlm(
    mini: MiniPab, tmp_path: Path, cli
) -> None:
    out = tmp_path / "run"
    code, _, err = cli("train", "xvlm", "--config", TINY_YAML, *set_args(sets(mini, out)))
    assert code == 0, err
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["kind"] == "step"]
    assert len(losses) == 3 * (240 // 8)
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5
    assert {"itc", "itm"} <= set(log[0]) and "mlm" not in log[0]
    evals = [r for r in log if r["kind"] == "eval"]
    # 40 test images, 80 captions: chance mAP is H(40)/40 (~10.7%); 90 steps reach ~3x (34.0 measured).
    chance_map = 100 * sum(1 / r for r in range(1, 41)) / 40
    assert evals[-1]["itc"]["mAP"] >= 1.5 * chance_map, evals[-1]
    ck = torch.load(out / BEST, weights_only=True)
    assert ck["format"] == "tpas-xvlm-train/1" and ck["scheduler"]["warmup_steps"] == 9  # 0.1 x 90 steps

    sims = tmp_path / "xvlm.pt"
    code, _, err = cli("infer", "xvlm", "--images", mini.root / "test", "--queries", mini.test_annotation,
                       "--checkpoint", out / BEST, "--out", sims, "--rerank-k", "4", "--device", "cpu",
                       "--no-cache", "--workers", "0")  # fmt: skip
    assert code == 0, err
    from tpas.data.pab import load_ground_truth
    from tpas.models.engine import itc_path_for
    from tpas.scoring import evaluate
    from tpas.sims import SimsMatrix

    gt = load_ground_truth(mini.test_annotation)
    best_eval = next(e for e in evals if e["step"] == ck["step"])
    got = evaluate(SimsMatrix.load(itc_path_for(sims)), gt).metrics()
    assert got == pytest.approx(best_eval["itc"], abs=1e-6)  # the trainer's numbers are the checkpoint's
    final = SimsMatrix.load(sims)
    assert ((final.scores != -100.0).sum(dim=1) == 4).all()  # X-VLM's matrix: top-4 logits, -100 elsewhere


def _stop_at(step: int):
    def callback(event: dict) -> None:
        if event["kind"] == "step" and event["step"] == step:
            raise RuntimeError("simulated crash")

    return callback


def test_resume_after_a_crash_ends_with_the_same_weights(mini: MiniPab, tmp_path: Path) -> None:
    more = ("data.max_records=24", "train.batch_size=4", "train.epochs=2", "eval.enabled=false",
            "train.save_every_steps=4")  # fmt: skip
    full = train(tiny_cfg(mini, tmp_path / "a", *more), kind="xvlm")
    assert full.steps == 12
    crashed = tiny_cfg(mini, tmp_path / "b", *more)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashed, kind="xvlm", progress=_stop_at(9))
    ck = torch.load(tmp_path / "b" / LAST, weights_only=True)
    assert (ck["step"], ck["epoch"], ck["batch_in_epoch"]) == (8, 1, 2)
    assert train(crashed, kind="xvlm", resume=True).steps == 12
    a = torch.load(tmp_path / "a" / LAST, weights_only=True)
    b = torch.load(tmp_path / "b" / LAST, weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
    # A CMP run cannot resume from it (nor the other way round): the format names the kind.
    with pytest.raises(TpasInputError, match="expected format 'tpas-cmp-train/1', found 'tpas-xvlm-train/1'"):
        train(load_train_config("cmp_tiny", sets(mini, tmp_path / "b")), resume=True)


def test_initialisation_from_a_retrieval_checkpoint_or_the_pretraining(mini: MiniPab, tmp_path: Path) -> None:
    from tests.models.test_xvlm import fake_pretraining_state
    from tpas.models.cmp import CMPTokenizer

    cfg = tiny_cfg(mini, tmp_path / "o")
    vocab_size = CMPTokenizer(mini.vocab).vocab_size
    donor = XVLM(XVLMConfig.tiny("xvlm", vocab_size=vocab_size))
    torch.save({"model": donor.state_dict(), "config": {}}, tmp_path / "retrieval.pth")
    cfg["init"]["checkpoint"] = str(tmp_path / "retrieval.pth")
    built = build_xvlm(cfg, mini.vocab)
    for k, v in donor.state_dict().items():
        assert torch.equal(built.model.state_dict()[k], v), k
    assert "loaded strictly" in built.notes[0] and not built.report
    cfg["model"]["embed_dim"] = 64  # a model section that disagrees with the checkpoint is refused
    with pytest.raises(TpasInputError, match="embed_dim"):
        build_xvlm(cfg, mini.vocab)

    torch.save({"model": fake_pretraining_state(vocab_size=vocab_size)}, tmp_path / "16m.th")
    out = tmp_path / "pre"
    result = train(tiny_cfg(mini, out, f"init.pretrained={tmp_path / '16m.th'}", "train.max_steps=1",
                            "eval.enabled=false"), kind="xvlm")  # fmt: skip
    assert "loaded" in result.init[0] and "unexpected (ignored)" in result.init[0]
    report = (out / "init_report.txt").read_text().splitlines()
    assert "loaded vision_proj.weight" in report and "unexpected bbox_head.0.weight" in report
    both = tiny_cfg(mini, out, f"init.pretrained={tmp_path / '16m.th'}", f"init.checkpoint={tmp_path / 'r.pth'}")
    with pytest.raises(TpasInputError, match="not both"):
        train(both, kind="xvlm")


def test_a_subset_list_selects_pairs_and_a_bad_line_is_refused(mini: MiniPab, tmp_path: Path, cli) -> None:
    records = read_train_annotation(mini.train_annotations)
    images = list(dict.fromkeys(r.image for r in records))
    chosen = [images[3], images[0], images[10]]
    listing = tmp_path / "subset.txt"
    listing.write_text("\n".join(chosen) + "\n")
    picked = select_pairs(records, listing)
    assert picked == [r for r in records if r.image in set(chosen)] and len(picked) == 2 * len(chosen)
    started: list[dict] = []
    train(tiny_cfg(mini, tmp_path / "s", f"data.subset={listing}", "train.batch_size=2", "train.max_steps=1",
                   "eval.enabled=false"), kind="xvlm", progress=started.append)  # fmt: skip
    assert next(e for e in started if e["kind"] == "start")["records"] == 6

    bad = tmp_path / "bad.txt"
    bad.write_text(f"{chosen[0]}\ntrain/no_such_image.jpg\n")
    out = tmp_path / "refused"
    code, _, err = cli("train", "xvlm", "--config", TINY_YAML, *set_args(sets(mini, out, f"data.subset={bad}")))
    lines = err.strip().splitlines()  # the progress bar's line (when it started), then the one error line
    assert code == 2 and len(lines) <= 2 and "Traceback" not in err
    assert lines[-1] == f"error: {bad}, line 2: image 'train/no_such_image.jpg' is not in the training annotation"
    assert not out.exists()  # refused before anything was written


def test_torchrun_trains_xvlm_from_the_cli_with_rank0_checkpoints(mini: MiniPab, tmp_path: Path) -> None:
    out = tmp_path / "out"
    more = sets(mini, out, "data.max_records=16", "train.batch_size=4", "train.max_steps=2", "eval.rerank_k=0")
    run = torchrun(2, "-m", "tpas", "train", "xvlm", "--config", str(TINY_YAML), *set_args(more))
    assert run.returncode == 0, run.stderr[-3000:]
    ck = torch.load(out / LAST, weights_only=True)
    assert ck["step"] == 2 and ck["rng"]["cpu"].shape[0] == 2 and ck["history"]
    steps = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "step"] == [1, 2]


def test_random_resized_crop_and_warmup_fraction_follow_x_vlm() -> None:
    import random

    from PIL import Image

    from tpas.train.data import AugmentConfig, TrainTransform
    from tpas.train.optim import lr_factor, warmup_steps

    t = TrainTransform((48, 32), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), AugmentConfig(crop_scale=(0.5, 1.0)))
    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = t.crop_box(100, 200, rng)
        area, ratio = (right - left) * (bottom - top), (right - left) / (bottom - top)
        assert 0 <= left < right <= 100 and 0 <= top < bottom <= 200
        assert 0.5 * 20000 * 0.97 <= area <= 20000 and 3 / 4 * 0.95 <= ratio <= 4 / 3 * 1.05
    # No box of the drawn ratio fits a 1 x 100 strip: torchvision's fallback, the centred box of the clamped ratio.
    assert t.crop_box(1, 100, random.Random(0)) == (0, 49, 1, 50)
    x, pose = t(Image.new("RGB", (100, 200), (10, 20, 30)), None, random.Random(1))
    assert tuple(x.shape) == (3, 48, 32) and pose is None  # (height, width)
    with pytest.raises(TpasInputError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.0, 1.0))
    assert warmup_steps(0.1, 95) == 9 and warmup_steps(500, 95) == 500 and warmup_steps(0, 95) == 0
    with pytest.raises(TpasInputError, match="warmup_steps"):
        warmup_steps(-1, 10)
    # X-VLM's linear schedule: up over the warm-up, then straight down to 0 at the last step.
    assert [lr_factor(s, 10, 2, 3e-5, 0.0, "linear") for s in (0, 1, 2, 6, 10)] == pytest.approx(
        [0.0, 0.5, 1.0, 0.5, 0.0]
    )


def test_pretraining_tables_are_resampled_to_the_window_as_x_vlm_fine_tuning_does(
    mini: MiniPab, tmp_path: Path
) -> None:
    from tests.models.test_xvlm import fake_pretraining_state
    from tpas.models.cmp import CMPTokenizer
    from tpas.models.xvlm.pretrained import _geometric_offsets, interpolate_relative_position_table

    # Window 7 -> 12 (the 16M model at 224 px -> 384 px): the 13 source offsets sit on a geometric grid out to +-11,
    # and a bicubic spline reproduces any cubic: the resampled table is the cubic at the 23 integer offsets.
    grid = torch.tensor(_geometric_offsets(13, 23), dtype=torch.float64)
    assert grid[6] == 0 and grid[7] == 1 and grid[-1] == pytest.approx(11.0, abs=1e-4)
    rows, cols = grid.view(-1, 1), grid.view(1, -1)
    table = torch.stack([(rows + 2 * cols).reshape(-1), (rows**3 - rows * cols).reshape(-1)], 1).float()
    out = interpolate_relative_position_table(table, 12)
    t = torch.arange(-11.0, 12.0, dtype=torch.float64).clamp(float(grid[0]), float(grid[-1]))
    r, c = t.view(-1, 1), t.view(1, -1)
    assert out.shape == (529, 2)
    assert torch.allclose(out[:, 0].double(), (r + 2 * c).reshape(-1), atol=1e-4)
    assert torch.allclose(out[:, 1].double(), (r**3 - r * c).reshape(-1), atol=1e-3)
    assert interpolate_relative_position_table(table, 7) is table

    # The trainer's `init.pretrained` resamples a pre-training of another window and says so, key by key.
    vocab_size = CMPTokenizer(mini.vocab).vocab_size
    torch.save(fake_pretraining_state(vocab_size=vocab_size, window_size=4), tmp_path / "w4.th")
    cfg = tiny_cfg(mini, tmp_path / "o", f"init.pretrained={tmp_path / 'w4.th'}")
    built = build_xvlm(cfg, mini.vocab)
    resampled = [line.split()[1] for line in built.report if line.startswith("interpolated ")]
    assert "vision_encoder.layers.0.blocks.0.attn.relative_position_bias_table" in resampled
    assert "interpolated (new window)" in built.notes[0]
