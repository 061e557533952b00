"""The CMP trainer end to end on a synthetic mini-PAB: it learns, resumes bit-for-bit, writes checkpoints that
`tpas infer cmp` loads, initialises from partial weights, and reports bad input in one line."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from train_fixtures import random_batch, tiny_model
from typer.testing import CliRunner

from tpas.cli import app, main
from tpas.data.synthetic import MiniPab, generate_mini_pab
from tpas.errors import TpasInputError
from tpas.train.checkpoints import BEST, LAST
from tpas.train.config import load_train_config
from tpas.train.losses import LossConfig, compute_losses
from tpas.train.model_setup import enable_gradient_checkpointing, initialise
from tpas.train.optim import lr_factor, param_groups
from tpas.train.trainer import train

TINY_YAML = Path(__file__).resolve().parents[2] / "configs" / "train" / "cmp_tiny.yaml"


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> MiniPab:
    return generate_mini_pab(
        tmp_path_factory.mktemp("pab") / "mini",
        seed=0,
        n_identities=60,
        n_val_identities=2,
        n_test_identities=20,
        n_distractors=0,
        image_size=(32, 64),
    )


def tiny_cfg(mini: MiniPab, out: Path, *sets: str) -> dict:
    base = [f"data.root={mini.root}", f"data.vocab={mini.vocab}", f"output.dir={out}", "train.log_every=1"]
    return load_train_config(TINY_YAML, [*base, *sets])


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_retrieves_far_above_chance(mini: MiniPab, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "cmp", "--config", str(TINY_YAML), "--set", f"data.root={mini.root}", "--set",
            f"data.vocab={mini.vocab}", "--set", f"output.dir={out}", "--set", "train.log_every=1",
            "--set", "train.epochs=2", "--set", "optim.warmup_steps=5", "--set", "eval.rerank_k=4"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    log = _log(out)
    losses = [r["loss"] for r in log if r["kind"] == "step"]
    assert len(losses) == 2 * (240 // 16)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    evals = [r for r in log if r["kind"] == "eval"]
    assert [e["epoch"] for e in evals] == [0, 1]
    # 40 test images, 80 captions: a random ranking has R@k = k/40 and mAP = H(40)/40 (~10.7%).
    # After 30 steps of batch 16 the tiny model reaches ~3x chance at R@1 and R@5 and ~2x at mAP.
    final = evals[-1]["itc"]
    chance_map = 100 * sum(1 / r for r in range(1, 41)) / 40
    assert final["R@1"] >= 2 * 100 / 40 and final["R@5"] >= 2 * 500 / 40, final
    assert final["mAP"] >= 1.6 * chance_map, final
    assert "itm" in evals[-1]

    # The checkpoint is weights_only-loadable and `tpas infer cmp` reproduces the trainer's own ITC evaluation.
    ck = torch.load(out / BEST, weights_only=True)
    assert {"model", "config", "optimizer", "scaler", "rng", "epoch", "step"} <= set(ck)
    assert (out / "vocab.txt").read_bytes() == mini.vocab.read_bytes()
    sims = tmp_path / "cmp.pt"
    infer = ["infer", "cmp", "--images", str(mini.root / "test"), "--pose", str(mini.root / "pose" / "test"),
             "--queries", str(mini.test_annotation), "--checkpoint", str(out / BEST), "--out", str(sims),
             "--device", "cpu", "--no-cache", "--workers", "0"]  # fmt: skip
    result = CliRunner().invoke(app, infer)
    assert result.exit_code == 0, result.output
    from tpas.data.pab import load_ground_truth
    from tpas.scoring import evaluate
    from tpas.sims import SimsMatrix

    got = evaluate(SimsMatrix.load(sims), load_ground_truth(mini.test_annotation)).metrics()
    best_eval = next(e for e in evals if e["step"] == ck["step"])["itc"]
    assert got["mAP"] == pytest.approx(best_eval["mAP"], abs=0.5)


def _stop_at(step: int):
    def callback(event: dict) -> None:
        if event["kind"] == "step" and event["step"] == step:
            raise RuntimeError("simulated crash")

    return callback


def test_resume_after_a_crash_ends_with_the_same_weights(mini: MiniPab, tmp_path: Path) -> None:
    sets = ("data.max_records=24", "train.batch_size=4", "train.epochs=2", "eval.enabled=false",
            "train.save_every_steps=4")  # fmt: skip
    full = train(tiny_cfg(mini, tmp_path / "a", *sets))
    assert full.steps == 12
    crashed = tiny_cfg(mini, tmp_path / "b", *sets)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashed, progress=_stop_at(9))
    ck = torch.load(tmp_path / "b" / LAST, weights_only=True)
    assert (ck["step"], ck["epoch"], ck["batch_in_epoch"]) == (8, 1, 2)  # mid-epoch checkpoint at step 8
    resumed = train(crashed, resume=True)
    assert resumed.steps == 12
    a = torch.load(tmp_path / "a" / LAST, weights_only=True)
    b = torch.load(tmp_path / "b" / LAST, weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
    assert torch.equal(a["rng"]["cpu"], b["rng"]["cpu"])


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    batch = random_batch(4, seed=2)
    grads = []
    for ckpt in (False, True):
        model = tiny_model(seed=1)
        if ckpt:
            assert enable_gradient_checkpointing(model) > 0
        torch.manual_seed(3)  # same dropout masks: non-reentrant checkpointing replays the RNG state
        compute_losses(model, batch, LossConfig(itm_in_batch_negatives=False))["total"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, atol=1e-6), name


def test_schedule_and_parameter_groups_follow_the_recipe() -> None:
    assert lr_factor(0, 1000, 500, 1e-4, 1e-5, "linear") == 0.0
    assert lr_factor(250, 1000, 500, 1e-4, 1e-5, "linear") == pytest.approx(0.5)
    assert lr_factor(500, 1000, 500, 1e-4, 1e-5, "linear") == pytest.approx(1.0)
    assert lr_factor(1000, 1000, 500, 1e-4, 1e-5, "linear") == pytest.approx(0.1)  # ends at 1e-5
    model = tiny_model()
    cfg = load_train_config(TINY_YAML)
    groups = {g["name"]: g for g in param_groups(model, cfg["optim"])}
    by_param = {id(p): g for g in groups.values() for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["itm_head.0.weight"])]["lr_mult"] == 2.0
    assert by_param[id(named["vision_encoder.layers.0.blocks.0.attn.qkv.weight"])]["lr_mult"] == 1.0
    assert by_param[id(named["itm_head.0.bias"])]["weight_decay"] == 0.0
    assert by_param[id(named["itm_head.0.weight"])]["weight_decay"] == 0.01
    n_params = len({id(p) for p in model.parameters()})
    assert sum(len(g["params"]) for g in groups.values()) == n_params  # tied weights counted once


def test_initialisation_from_separate_swin_and_bert_files(tmp_path: Path) -> None:
    donor = tiny_model(seed=7)
    swin = {f"{k}": v for k, v in donor.vision_encoder.state_dict().items()}
    swin["head.weight"] = torch.zeros(10, 128)  # a classifier the CMP image encoder does not have
    torch.save({"model": swin}, tmp_path / "swin.pth")
    bert = {f"bert.{k}": v for k, v in donor.text_encoder.bert.state_dict().items() if "crossattention" not in k}
    bert["bert.pooler.dense.weight"] = torch.zeros(128, 128)
    (tmp_path / "bert").mkdir()
    torch.save(bert, tmp_path / "bert" / "pytorch_model.bin")
    model = tiny_model(seed=8)
    notes = initialise(model, {"swin": str(tmp_path / "swin.pth"), "bert": str(tmp_path / "bert")})
    swin_note, bert_note = notes
    assert swin_note.unexpected == [] and swin_note.missing == []
    assert "text_encoder.bert.pooler.dense.weight" in bert_note.unexpected
    assert any("crossattention" in k for k in bert_note.missing)  # the fusion layers' new cross-attention
    sd, want = model.state_dict(), donor.state_dict()
    assert torch.equal(sd["vision_encoder.patch_embed.proj.weight"], want["vision_encoder.patch_embed.proj.weight"])
    key = "text_encoder.bert.encoder.layer.3.attention.self.query.weight"
    assert torch.equal(sd[key], want[key])
    cross = "text_encoder.bert.encoder.layer.3.crossattention.self.query.weight"
    assert not torch.equal(sd[cross], want[cross])
    # An X-VLM-style full checkpoint whose projection has another width: reported, not loaded.
    xvlm = dict(donor.state_dict())
    xvlm["vision_proj.2.weight"] = torch.zeros(256, 3 * 128)
    torch.save({"model": xvlm}, tmp_path / "xvlm.th")
    (note,) = initialise(tiny_model(seed=9), {"checkpoint": str(tmp_path / "xvlm.th")})
    assert note.mismatched and note.mismatched[0].startswith("vision_proj.2.weight")
    assert "shape-mismatched 1" in note.describe()


def test_bad_input_is_one_line_exit_2(mini: MiniPab, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def run(*args: str) -> str:
        with pytest.raises(SystemExit) as e:
            main(["train", "cmp", "--config", str(TINY_YAML), *args])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and len(err.splitlines()) <= 2
        return err

    assert "train.epoch" in run("--set", "train.epoch=3")
    cpu_bf16 = run("--set", "train.precision=bf16", "--set", "train.device=cpu")
    assert "train.precision bf16 needs a CUDA device" in cpu_bf16  # the one precision rule of infer and train
    assert "vocab" in run("--set", f"data.vocab={tmp_path / 'none.txt'}")
    common = ["--set", f"data.root={mini.root}", "--set", f"data.vocab={mini.vocab}"]
    assert "no checkpoint to resume from" in run(*common, "--set", f"output.dir={tmp_path / 'o'}", "--resume")
    # A training record whose image is missing names the file and the record.
    bad = tmp_path / "bad"
    (bad / "annotation" / "train").mkdir(parents=True)
    record = json.loads(mini.train_annotations[0].read_text())[0]
    (bad / "annotation" / "train" / "attr_0.json").write_text(json.dumps([record] * 4))
    with pytest.raises(TpasInputError, match="image file not found") as e:
        train(load_train_config(TINY_YAML, [f"data.root={bad}", f"data.vocab={mini.vocab}",
                                            f"output.dir={tmp_path / 'o2'}", "train.batch_size=2"]))  # fmt: skip
    assert "record 0" in str(e.value)


def test_trainer_evaluation_equals_infer_then_evaluate(mini: MiniPab, tmp_path: Path) -> None:
    """The per-epoch numbers are those of `tpas infer cmp --rerank-k` + `tpas evaluate` on the saved checkpoint."""
    from tpas.data.pab import load_ground_truth
    from tpas.models import load_model
    from tpas.models.cmp import CMP, CMPConfig, CMPTokenizer
    from tpas.models.engine import infer, itc_path_for
    from tpas.scoring import evaluate
    from tpas.sims import SimsMatrix
    from tpas.train.evaluation import evaluate_model

    vocab_size = CMPTokenizer(mini.vocab, 56, 56).vocab_size
    torch.manual_seed(4)
    model = CMP(CMPConfig.tiny(vocab_size=vocab_size))
    # Every image gets the same ITC feature: each row's ITC is one big tie, so which k candidates the ITM re-ranks
    # is decided by the tie rule alone (stable: the first k columns in the engine's id order).
    with torch.no_grad():
        model.vision_proj[2].weight.zero_()
        model.vision_proj[2].bias.fill_(1.0)
    model.set_tokenizer(mini.vocab)
    got = evaluate_model(model, mini.test_annotation, mini.root, torch.device("cpu"), contextlib.nullcontext,
                         batch_size=16, rerank_k=5)  # fmt: skip
    ckpt = tmp_path / "ck.pth"
    torch.save({"model": model.state_dict(), "config": model.config.to_dict()}, ckpt)
    engine_model = load_model("cmp", ckpt, vocab=mini.vocab)
    out = tmp_path / "cmp.pt"
    infer(engine_model, mini.root / "test", mini.test_annotation, out, pose_dir=mini.root / "pose" / "test",
          rerank_k=5, batch_size=16, num_workers=0, device="cpu", use_cache=False)  # fmt: skip
    gt = load_ground_truth(mini.test_annotation)
    assert got["itc"] == evaluate(SimsMatrix.load(itc_path_for(out)), gt).metrics()
    assert got["itm"] == evaluate(SimsMatrix.load(out), gt).metrics()


def test_divergence_stops_with_one_line_naming_the_step_and_the_last_checkpoint(
    mini: MiniPab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from tpas.train import losses

    real = losses.CMPLossModule.forward
    calls = {"n": 0}

    def diverge_at_step_3(self, batch):
        out = real(self, batch)
        calls["n"] += 1
        if calls["n"] >= 3:
            out = {**out, "itc": out["itc"] * float("nan"), "total": out["total"] * float("nan")}
        return out

    monkeypatch.setattr(losses.CMPLossModule, "forward", diverge_at_step_3)
    out = tmp_path / "run"
    sets = [f"data.root={mini.root}", f"data.vocab={mini.vocab}", f"output.dir={out}", "train.batch_size=4",
            "train.save_every_steps=2", "eval.enabled=false", "data.num_workers=0"]  # fmt: skip
    args = ["train", "cmp", "--config", str(TINY_YAML), *(a for s in sets for a in ("--set", s))]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.startswith("error: training diverged at step 3")
    assert f"the last good checkpoint is {out / LAST}" in err and "--resume" in err
