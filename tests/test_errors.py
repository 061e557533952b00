"""The typed errors' one-line messages."""

from __future__ import annotations

from tpas.errors import TpasError, training_diverged


def test_training_divergence_names_the_step_the_losses_and_the_checkpoint_to_resume_from():
    e = training_diverged(1234, {"total": float("nan"), "itc": 0.5, "itm": float("inf")}, "out/checkpoint_03.pth")
    assert isinstance(e, TpasError)
    assert str(e) == (
        "training diverged at step 1234: non-finite loss (total=nan, itm=inf); the last good checkpoint is "
        "out/checkpoint_03.pth; lower the learning rate (--set optim.lr=...) and continue from it with --resume"
    )
    assert "no checkpoint was written yet" in str(training_diverged(5, {"total": float("nan")}, None))
