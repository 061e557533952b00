"""`tpas pose`: OpenPose-style pose maps for CMP, from keypoint files or a detector."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import TpasInputError
from .common import console, progress_bar

app = typer.Typer()


@app.command("pose")
def pose_cmd(
    images: Annotated[Path, typer.Option("--images", help="Image folder (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: one map per image, same relative path.")],
    keypoints: Annotated[
        Path | None,
        typer.Option("--keypoints", help="OpenPose *_keypoints.json folder/file or a COCO keypoint annotation file."),
    ] = None,
    detector: Annotated[
        str | None, typer.Option("--detector", help="Detector backend for images without keypoints (keypointrcnn).")
    ] = None,
    weights: Annotated[Path | None, typer.Option("--weights", help="Local weights file of the detector.")] = None,
    device: Annotated[str, typer.Option("--device", help="Device for the detector (cpu, cuda).")] = "cpu",
    stick_width: Annotated[int, typer.Option("--stick-width", help="Limb half-width in pixels.")] = 4,
    radius: Annotated[int, typer.Option("--radius", help="Joint radius in pixels.")] = 4,
) -> None:
    """Render an OpenPose-style skeleton map (COCO-18, standard colours, on black, image size) for every image.

    Images with no person get an all-black map and are listed in OUT/pose_log.json.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    from ..pose import get_detector, make_pose_maps

    if detector is None and weights is not None:
        raise TpasInputError("--weights needs --detector NAME")
    det = get_detector(detector, weights, device=device) if detector is not None else None
    with progress_bar("pose", TextColumn("pose maps"), BarColumn(), MofNCompleteColumn()) as update:
        report = make_pose_maps(
            images,
            out,
            keypoints=keypoints,
            detector=det,
            stick_width=stick_width,
            radius=radius,
            progress=update,
        )
    console.print(
        f"{out}: {report.images} pose maps, {report.with_person} with a person, {len(report.no_person)} all-black "
        f"(listed in {report.log_path})",
        highlight=False,
        soft_wrap=True,
    )
