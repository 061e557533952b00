"""`tpas synth`: a synthetic mini-PAB in the PAB file layouts (training data for the demo and the tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import console, progress_bar

app = typer.Typer()


@app.command("synth")
def synth_cmd(
    out: Annotated[Path, typer.Option("--out", help="Output folder (the mini-PAB root).")],
    seed: Annotated[int, typer.Option(help="Random seed; the same seed writes byte-identical files.")] = 0,
    identities: Annotated[int, typer.Option(help="Training identities (2 images each: normal + anomalous).")] = 100,
    val_identities: Annotated[int, typer.Option(help="Validation identities (2 images each).")] = 20,
    test_identities: Annotated[int, typer.Option(help="Test identities (2 images each).")] = 30,
    distractors: Annotated[int, typer.Option(help="Extra distractor images in the name-masked gallery.")] = 40,
    width: Annotated[int, typer.Option(help="Image width in pixels.")] = 64,
    height: Annotated[int, typer.Option(help="Image height in pixels.")] = 128,
    train_files: Annotated[int, typer.Option(help="Number of annotation/train/attr_K.json files.")] = 2,
    train_captions: Annotated[int, typer.Option(help="Training records (captions) per training image.")] = 2,
    test_captions: Annotated[int, typer.Option(help="Captions per image in the val/test attr.json.")] = 2,
    framing: Annotated[
        str, typer.Option(help="scene (person ~half the image over their scene) | person (figure fills the frame).")
    ] = "scene",
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
) -> None:
    """Generate a synthetic mini-PAB (images, pose maps, annotations, name-masked set, vocab) in the PAB layouts."""
    from ..data.synthetic import generate_mini_pab

    with progress_bar("drawing") as update:
        mp = generate_mini_pab(
            out,
            seed=seed,
            n_identities=identities,
            n_val_identities=val_identities,
            n_test_identities=test_identities,
            n_distractors=distractors,
            image_size=(width, height),
            n_train_files=train_files,
            train_captions_per_image=train_captions,
            test_captions_per_image=test_captions,
            framing=framing,
            overwrite=overwrite,
            progress=update,
        )
    console.print(
        f"mini-PAB in {mp.root}: {mp.n_train_pairs} training pairs, {mp.n_val_images} val / {mp.n_test_images} test "
        f"images, name-masked gallery of {mp.n_gallery}; vocab {mp.vocab}"
    )
