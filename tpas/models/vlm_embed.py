"""VLM embedding models as a tpas family: `tpas infer vlm-embed --checkpoint DIR ...` (GME-Qwen2-VL, Qwen3-VL-Embedding
style: a Qwen2-VL / Qwen2.5-VL / Qwen3-VL backbone from a local transformers folder).

Each image and each caption is wrapped in its instruction prompt, run through the backbone, and embedded as the final
hidden state of the last token, L2-normalised; sims = cosine (docs/models/encoders.md). Sequences are padded on the
left, so the last position is every sequence's own last token in a batch too, and the attention mask goes through
(Qwen's 3-D rotary positions are computed from it): batched == one at a time.

Prompt styles:
- `gme` (GME's gme_inference.py): `<|im_start|>system\\n{instruction}<|im_end|>\\n<|im_start|>user\\n{content}`
  `<|im_end|>\\n<|im_start|>assistant\\n<|endoftext|>`, content = the caption or
  `<|vision_start|><|image_pad|><|vision_end|>`;
- `chat-template` (Qwen3-VL-Embedding): the processor's chat template with a system turn holding the instruction, a
  user turn holding the image or caption, and the generation prompt.
Image size fixes the number of visual tokens: each image is resized by the processor to [min_pixels, max_pixels]
(defaults: GME's 256..1280 visual tokens), recorded in meta.
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

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
PROMPT_STYLES = ("gme", "chat-template")
# Documented defaults per prompt style: (query instruction, image instruction).
INSTRUCTIONS = {
    "gme": ("Find an image that matches the given text.", "You are a helpful assistant."),
    "chat-template": ("Retrieve images or text relevant to the user's query.", "Represent the user's input."),
}
_IMAGE_CONTENT = "<|vision_start|><|image_pad|><|vision_end|>"
# GME's visual-token bounds (min_image_tokens / max_image_tokens), the default for every style.
DEFAULT_TOKENS = (256, 1280)


class VlmImagePreprocess:
    """The processor's output for (image prompt, image), one item, unpadded. Picklable, no weights.

    The prompt's tokens depend on the image only through its number of visual tokens, so the processor's full call
    (tokenizer and all) runs once per count and later images of that count run the image processor alone.
    """

    def __init__(self, processor: Any, prompt: str):
        self.processor = processor
        self.prompt = prompt
        self.tokens: dict[int, Features] = {}  # visual-token count -> the prompt's token tensors

    def __call__(self, image: Image.Image, pose: Image.Image | None = None) -> Features:
        ip = self.processor.image_processor
        pixels = ip(images=[image], return_tensors="pt")
        grid = pixels["image_grid_thw"][0]
        count = int(grid.prod()) // int(ip.merge_size) ** 2
        if count not in self.tokens:
            out = self.processor(text=[self.prompt], images=[image], return_tensors="pt")
            self.tokens[count] = {k: v[0] for k, v in out.items() if v.shape == out["input_ids"].shape}
        return {"pixel_values": pixels["pixel_values"], "image_grid_thw": grid, **self.tokens[count]}


class VlmCollate:
    """Batches `VlmImagePreprocess` items (or their [2, ...] TTA views): prompt tokens left-padded to the batch's
    longest (the last position stays every prompt's last token), patches padded at the end to the batch's most
    (`encode_images` takes each image's own); the grids stacked. Picklable."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[Features]) -> Features:
        out = {}
        for key in items[0]:
            parts = [it[key] for it in items]
            if key == "image_grid_thw":
                out[key] = torch.stack(parts)
            elif key == "pixel_values":
                out[key] = _pad_stack(parts, dim=-2, left=False, value=0)
            else:
                out[key] = _pad_stack(parts, dim=-1, left=True, value=self.pad_id if key == "input_ids" else 0)
        return out


def _pad_stack(parts: list[torch.Tensor], dim: int, left: bool, value: int) -> torch.Tensor:
    """Stack tensors that differ only in size along `dim` (negative), padding each with `value` on one side."""
    size = max(p.shape[dim] for p in parts)
    shape = list(parts[0].shape)
    shape[dim] = size
    out = parts[0].new_full((len(parts), *shape), value)
    for row, p in zip(out, parts, strict=True):
        n = p.shape[dim]
        row.narrow(dim, size - n if left else 0, n).copy_(p)
    return out


@register("vlm-embed")
class VlmEmbedModel(RetrievalModel):
    """A Qwen-VL embedding model: instruction prompts, last-token pooling, left padding, L2-normalised features."""

    options = (
        FamilyOption("query_instruction", str, "Instruction of the caption prompts (default: the prompt style's)."),
        FamilyOption("image_instruction", str, "Instruction of the image prompts (default: the prompt style's)."),
        FamilyOption(
            "prompt_style",
            str,
            "gme | chat-template (default: gme for Qwen2-VL, chat-template for Qwen3-VL).",
            None,
            PROMPT_STYLES,
        ),
        FamilyOption("min_pixels", int, "Smallest image area after the processor's resize (default 256 tokens)."),
        FamilyOption("max_pixels", int, "Largest image area after the processor's resize (default 1280 tokens)."),
        TTA_OPTION,
    )

    def __init__(self, model: torch.nn.Module, processor: Any, settings: dict[str, Any]):
        super().__init__()
        self.model = model
        self.processor = processor
        self.settings = settings
        self.tta = settings["tta"]
        self.image_prompt = self.prompt(settings["image_instruction"], None)

    @classmethod
    def from_checkpoint(
        cls,
        path: Path | None,
        config: dict[str, Any] | None = None,
        *,
        query_instruction: str | None = None,
        image_instruction: str | None = None,
        prompt_style: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        tta: str | None = None,
    ) -> VlmEmbedModel:
        """Build from a transformers folder (Qwen2-VL / Qwen2.5-VL / Qwen3-VL); see the module docstring."""
        from transformers import AutoModel

        tta = check_tta(tta)
        hf_config = read_config(path, "vlm-embed", MODEL_TYPES, "Alibaba-NLP/gme-Qwen2-VL-2B-Instruct")
        path = Path(path)  # type: ignore[arg-type]  # read_config refused None
        check_config(config, hf_config, path, "vlm-embed")
        style = prompt_style or ("chat-template" if hf_config.model_type == "qwen3_vl" else "gme")
        if style not in PROMPT_STYLES:
            raise TpasInputError(f"--prompt-style {style!r}; expected one of {', '.join(PROMPT_STYLES)}")
        processor = load_processor(path)
        ip = processor.image_processor
        factor = int(ip.patch_size) * int(ip.merge_size)
        lo = min_pixels if min_pixels is not None else DEFAULT_TOKENS[0] * factor**2
        hi = max_pixels if max_pixels is not None else DEFAULT_TOKENS[1] * factor**2
        if not factor**2 <= lo <= hi:
            raise TpasInputError(f"need {factor**2} <= --min-pixels ({lo}) <= --max-pixels ({hi})")
        processor = load_processor(path, size={"shortest_edge": lo, "longest_edge": hi})
        if style == "chat-template" and not getattr(processor, "chat_template", None):
            raise TpasInputError("--prompt-style chat-template: the folder's processor has no chat template", path)
        settings = {
            "model_type": hf_config.model_type,
            "prompt_style": style,
            "query_instruction": query_instruction or INSTRUCTIONS[style][0],
            "image_instruction": image_instruction or INSTRUCTIONS[style][1],
            "min_pixels": lo,
            "max_pixels": hi,
            "tta": tta,
        }
        model = load_weights(AutoModel, path, allow_unused=("lm_head.",))
        out = cls(model, processor, settings)
        out.checkpoint_path = path
        return out

    def prompt(self, instruction: str, text: str | None) -> str:
        """The full prompt of one caption (`text`) or one image (`text` None) in this model's prompt style."""
        if self.settings["prompt_style"] == "gme":
            content = _IMAGE_CONTENT if text is None else text
            return (
                f"<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n{content}<|im_end|>\n"
                "<|im_start|>assistant\n<|endoftext|>"
            )
        user = [{"type": "image"}] if text is None else [{"type": "text", "text": text}]
        messages = [
            {"role": "system", "content": [{"type": "text", "text": instruction}]},
            {"role": "user", "content": user},
        ]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def describe(self) -> dict[str, Any]:
        """Backbone, prompts, pixel bounds, pooling and TTA (JSON-able)."""
        return {
            "family": "vlm-embed",
            **self.settings,
            "architectures": list(self.model.config.architectures or []),
            "config": self.model.config.to_diff_dict(),
            "image_prompt": self.image_prompt,
            "caption_prompt": self.prompt(self.settings["query_instruction"], "{caption}"),
            "pooling": "last token of the final hidden state, left padding",
            "features": "L2-normalised; similarity = text @ image.T",
        }

    @property
    def image_preprocessor(self) -> Any:
        """The picklable processor call that DataLoader workers run, with the mirror view for TTA."""
        return with_tta(VlmImagePreprocess(self.processor, self.image_prompt), self.tta)

    @property
    def image_collate(self) -> VlmCollate:
        """Pads each batch only as far as its own longest prompt and largest image need."""
        return VlmCollate(self.processor.tokenizer.pad_token_id)

    def preprocess(self, image: Image.Image, pose: Image.Image | None = None) -> Features:
        """Prompt tokens and patches of one image (unpadded); with TTA, the image and its mirror."""
        return self.image_preprocessor(image, pose)

    def tokenize(self, texts: Sequence[str]) -> Features:
        """Caption prompts, left-padded to the longest in the batch."""
        tok = self.processor.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        try:
            prompts = [self.prompt(self.settings["query_instruction"], t) for t in texts]
            enc = self.processor(text=prompts, padding=True, return_tensors="pt")
        finally:
            tok.padding_side = side
        return {k: v for k, v in enc.items() if v.shape == enc["input_ids"].shape}

    def _pool(self, inputs: Features) -> torch.Tensor:
        hidden = self.model(**inputs).last_hidden_state
        return torch.nn.functional.normalize(hidden[:, -1].float(), dim=-1)

    def encode_images(self, batch: Features) -> Features:
        """L2-normalised last-token features [N, D] of the image prompts."""

        def encode(b: Features) -> torch.Tensor:
            mask = b["attention_mask"]
            start = int((mask.cumsum(1) == 0).sum(1).min())  # columns that are padding in every row
            grid = b["image_grid_thw"]
            n = grid.prod(dim=1)
            pixels = torch.cat([b["pixel_values"][i, : int(n[i])] for i in range(len(n))])
            tokens = {k: v[:, start:] for k, v in b.items() if k not in ("pixel_values", "image_grid_thw")}
            return self._pool({**tokens, "pixel_values": pixels, "image_grid_thw": grid})

        return encode_views(encode, batch, self.tta)

    def encode_texts(self, tokens: Features) -> Features:
        """L2-normalised last-token features [N, D] of the caption prompts."""
        return {"embed": self._pool(dict(tokens))}
