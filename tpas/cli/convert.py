"""`tpas convert`: released checkpoints -> layouts `tpas infer` loads (BLIP-2 from LAVIS)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import choice, console, err_console, existing_file

app = typer.Typer(help="Convert released checkpoints into what `tpas infer` loads.", no_args_is_help=True)


@app.command("blip2-lavis")
def convert_blip2_lavis_cmd(
    qformer: Annotated[Path, typer.Argument(help="LAVIS blip2_pretrained.pth / blip2_pretrained_vitL.pth.")],
    vit: Annotated[Path, typer.Option("--vit", help="The ViT weights: eva_vit_g.pth (pretrain) or clip_vit_L.pth.")],
    out: Annotated[Path, typer.Option("--out", help="transformers directory to create.")],
    vocab: Annotated[
        Path | None, typer.Option("--vocab", help="bert-base-uncased vocab.txt (default: the copy shipped with tpas).")
    ] = None,
    model_type: Annotated[
        str | None,
        typer.Option("--model-type", help="pretrain (EVA ViT-g) | pretrain_vitL (CLIP ViT-L); default: from the ViT."),
    ] = None,
    vit_layers: Annotated[
        int | None, typer.Option("--vit-layers", help="ViT blocks to keep (default as LAVIS: 39 EVA, 23 CLIP-L).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    trust_checkpoint: Annotated[
        bool, typer.Option("--trust-checkpoint", help="Allow full unpickling of the input files.")
    ] = False,
) -> None:
    """Convert a LAVIS BLIP-2 checkpoint + its ViT file into a transformers directory (config, weights, tokenizer)."""
    from ..models.blip2_convert import MODEL_TYPES, convert_lavis

    if model_type is not None:
        choice(model_type, MODEL_TYPES, "--model-type")
    with err_console.status("converting"):
        summary = convert_lavis(
            existing_file(qformer),
            existing_file(vit),
            out,
            vocab=vocab,
            model_type=model_type,
            vit_layers=vit_layers,
            overwrite=overwrite,
            trust=trust_checkpoint,
        )
    vc = summary.config["vision_config"]
    console.print(
        f"{summary.out}: BLIP-2 {summary.model_type} ({vc['num_hidden_layers']} ViT blocks, width {vc['hidden_size']}),"
        f" {summary.hf_keys} tensors"
        + (f" + {', '.join(summary.extra_keys)}" if summary.extra_keys else "")
        + f"; {len(summary.dropped)} source keys dropped (unused at inference)"
    )
