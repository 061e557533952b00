"""transformers dual encoders as a tpas family: `tpas infer hf-dual --checkpoint DIR ...`.

DIR is a local transformers folder (config.json, model*.safetensors, the processor's image-processor and tokenizer
files), e.g. google/siglip2-so400m-patch16-naflex downloaded with `huggingface-cli download`. The architecture is the
folder's config.json (SiglipModel, Siglip2Model or CLIPModel); a `--config` that contradicts it is refused. Features
are the models' own `get_image_features` / `get_text_features` pooled outputs, L2-normalised; sims = cosine.

Test-time facts (docs/models/encoders.md):
- text is padded to `max_length` = the text tower's position count (SigLIP/SigLIP 2: 64, some SO400M: 16), on the
  right: SigLIP towers pool the last position, so dynamic or left padding changes every text embedding. SigLIP
  towers get the ids only (no padding mask; they were trained without one, as open_clip runs them), CLIP gets the
  mask (it pools at the EOS token, so the mask changes nothing but is what the model expects);
- images go through the folder's own image processor (SigLIP: squash to the square size, mean = std = 0.5; CLIP:
  shortest-side resize + center crop); Siglip2 NaFlex keeps the aspect ratio and cuts the image into at most
  `max_num_patches` patches (`--max-num-patches`, default the processor's), recorded in meta.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import TpasInputError
from .base import FamilyOption, Features, RetrievalModel, register
from .hf_folder import check_config, load_processor, load_weights, read_config
from .tta import TTA_OPTION, check_tta, encode_views, with_tta

MODEL_TYPES = ("siglip", "siglip2", "clip")
_SIGLIP = ("siglip", "siglip2")
_IMAGE_KEYS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")


class HfImagePreprocess:
    """The folder's image processor on one PIL image -> its tensors without the batch axis (picklable, no weights)."""

    def __init__(self, image_processor: Any, max_num_patches: int | None):
        self.image_processor = image_processor
        self.max_num_patches = max_num_patches

    def __call__(self, image: Image.Image, pose: Image.Image | None = None) -> Features:
        extra = {"max_num_patches": self.max_num_patches} if self.max_num_patches else {}
        out = self.image_processor(images=[image], return_tensors="pt", **extra)
        return {k: out[k][0] for k in _IMAGE_KEYS if k in out}


@register("hf-dual")
class HfDualModel(RetrievalModel):
    """SiglipModel / Siglip2Model / CLIPModel from a local folder; features L2-normalised, sims = cosine."""

    options = (
        FamilyOption(
            "max_num_patches", int, "Siglip2 NaFlex: at most this many patches per image (default: the processor's)."
        ),
        TTA_OPTION,
    )

    def __init__(self, model: torch.nn.Module, processor: Any, max_num_patches: int | None, tta: str):
        super().__init__()
        self.model = model
        self.processor = processor
        self.model_type = model.config.model_type
        self.tta = tta
        self.max_num_patches = max_num_patches
        if self.model_type == "siglip2" and max_num_patches is None:
            self.max_num_patches = int(processor.image_processor.max_num_patches)
        self.text_length = int(model.config.text_config.max_position_embeddings)
        self.text_keys = ("input_ids",) if self.model_type in _SIGLIP else ("input_ids", "attention_mask")

    @classmethod
    def from_checkpoint(
        cls,
        path: Path | None,
        config: dict[str, Any] | None = None,
        *,
        max_num_patches: int | None = None,
        tta: str | None = None,
    ) -> HfDualModel:
        """Build from a transformers folder; `config` (keys of config.json) must agree with the folder's."""
        from transformers import AutoModel

        tta = check_tta(tta)
        hf_config = read_config(path, "hf-dual", MODEL_TYPES, "google/siglip2-base-patch16-naflex")
        path = Path(path)  # type: ignore[arg-type]  # read_config refused None
        check_config(config, hf_config, path, "hf-dual")
        if max_num_patches is not None:
            if hf_config.model_type != "siglip2":
                raise TpasInputError(f"--max-num-patches applies to Siglip2 (NaFlex) only, not {hf_config.model_type}")
            if max_num_patches < 1:
                raise TpasInputError(f"--max-num-patches must be >= 1, got {max_num_patches}")
        model = load_weights(AutoModel, path)
        processor = load_processor(path)
        out = cls(model, processor, max_num_patches, tta)
        out.checkpoint_path = path
        return out

    def describe(self) -> dict[str, Any]:
        """Architecture, the image processor's settings, text padding and TTA (JSON-able)."""
        ip = self.processor.image_processor
        pre = {k: v for k, v in ip.to_dict().items() if isinstance(v, (int, float, str, bool, list, dict, type(None)))}
        out: dict[str, Any] = {
            "family": "hf-dual",
            "model_type": self.model_type,
            "architectures": list(self.model.config.architectures or [type(self.model).__name__]),
            "config": self.model.config.to_diff_dict(),
            "preprocess": {"image_processor": type(ip).__name__, **pre},
            "max_num_patches": self.max_num_patches,
            "tokenizer": {
                "type": type(self.processor.tokenizer).__name__,
                "padding": "max_length",
                "side": "right",
                "max_length": self.text_length,
                "inputs": list(self.text_keys),
            },
            "tta": self.tta,
            "features": "get_*_features pooler_output, L2-normalised; similarity = text @ image.T",
        }
        if self.model_type in _SIGLIP:
            out["sigmoid"] = {
                "logit_scale": float(self.model.logit_scale.detach().exp()),
                "logit_bias": float(self.model.logit_bias.detach()),
            }
        return out

    @property
    def image_preprocessor(self) -> Any:
        """The picklable image processor that DataLoader workers run, with the mirror view for TTA."""
        return with_tta(HfImagePreprocess(self.processor.image_processor, self.max_num_patches), self.tta)

    def preprocess(self, image: Image.Image, pose: Image.Image | None = None) -> Features:
        """The folder's image processor (one image, no batch axis); with TTA, the image and its mirror."""
        return self.image_preprocessor(image, pose)

    def tokenize(self, texts: Sequence[str]) -> Features:
        """The folder's tokenizer, right-padded and truncated to the text tower's length."""
        tok = self.processor.tokenizer
        side, tok.padding_side = tok.padding_side, "right"
        try:
            enc = tok(
                list(texts), padding="max_length", max_length=self.text_length, truncation=True, return_tensors="pt"
            )
        finally:
            tok.padding_side = side
        return {k: enc[k] for k in self.text_keys}

    def encode_images(self, batch: Features) -> Features:
        """L2-normalised image features [N, D]."""

        def encode(b: Features) -> torch.Tensor:
            return torch.nn.functional.normalize(self.model.get_image_features(**b).pooler_output.float(), dim=-1)

        return encode_views(encode, batch, self.tta)

    def encode_texts(self, tokens: Features) -> Features:
        """L2-normalised text features [N, D]."""
        feats = self.model.get_text_features(**{k: tokens[k] for k in self.text_keys}).pooler_output
        return {"embed": torch.nn.functional.normalize(feats.float(), dim=-1)}
