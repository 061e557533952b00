"""The `vlm` family: a vision-language model that re-ranks candidate pairs (it has no gallery embedding).

`tpas infer vlm --checkpoint DIR --candidates SIMS --rerank-k K ...` reads each query's top-K candidates from SIMS
and writes a top-K SimsMatrix of the model's scores (`tpas.models.vlm.runner`). Loading checks the folder, the
processor, its chat template, the score mode, the prompt and the yes/no tokens up front; the weights are loaded by
the run, directly in its precision and on its device (a 7B model is never materialised in fp32 first).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ...errors import TpasInputError
from ..base import FamilyOption, RetrievalModel, register
from ..hf_folder import missing_folder_error
from .batching import ImageSegmenter, image_placeholder
from .cloze import Lexicon
from .loading import (
    ATTN_IMPLEMENTATIONS,
    EXAMPLE,
    apply_adapter,
    check_adapter_folder,
    image_settings,
    load_processor,
    load_weights,
    read_config,
)
from .prompts import PromptSpec, prompt_spec, render
from .scores import DEFAULT_NO, DEFAULT_YES, SCORE_MODES, Answers, resolve_answers, score_logits

DEFAULT_MAX_NEW_TOKENS = 32  # one short line per blank; PAB captions have about 2-6 blanks


@dataclass(frozen=True)
class ModeOptions:
    """The options of one score mode beyond the prompt: pairwise's margin, cloze's lexicon and answer length."""

    margin: float = 0.0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    lexicon: Lexicon | None = None

    def describe(self, score: str) -> dict[str, Any]:
        """What changes the cached outputs (the margin only changes decisions, so it is not here)."""
        if score != "cloze" or self.lexicon is None:
            return {}
        return {"max_new_tokens": self.max_new_tokens, "lexicon_sha256": self.lexicon.digest()}


def mode_options(score: str, options: dict[str, Any]) -> ModeOptions:
    """Check the mode-specific options against `score`; TpasInputError naming the option that does not apply."""
    owners = {"margin": "pairwise", "max_new_tokens": "cloze", "cloze_lexicon": "cloze"}
    for name, mode in owners.items():
        if options.get(name) is not None and score != mode:
            raise TpasInputError(f"--{name.replace('_', '-')} applies to --score {mode} only, not {score}")
    new_tokens = options.get("max_new_tokens")
    if new_tokens is not None and new_tokens < 1:
        raise TpasInputError(f"--max-new-tokens must be >= 1, got {new_tokens}")
    if score == "cloze":
        lexicon = Lexicon.load(options.get("cloze_lexicon"))
        return ModeOptions(max_new_tokens=new_tokens or DEFAULT_MAX_NEW_TOKENS, lexicon=lexicon)
    return ModeOptions(margin=float(options.get("margin") or 0.0))


OPTIONS: tuple[FamilyOption, ...] = (
    FamilyOption("prompt", str, "Prompt template holding {caption} (yes-no, p-yes, pairwise).", None),
    FamilyOption("prompt_file", Path, "File holding the prompt template.", None),
    FamilyOption("system", str, "System turn (default: none; qwen3-vl-reranker: its judge instruction).", None),
    FamilyOption("score", str, "How logits become a score.", "yes-no", SCORE_MODES),
    FamilyOption("yes", str, f"Comma-separated 'yes' words (default {DEFAULT_YES}).", None),
    FamilyOption("no", str, f"Comma-separated 'no' words (default {DEFAULT_NO}).", None),
    FamilyOption("instruction", str, "The <Instruct> text of --score qwen3-vl-reranker.", None),
    FamilyOption("adapter", Path, "A PEFT adapter folder (LoRA, DoRA) to apply.", None),
    FamilyOption("merge_adapter", bool, "Merge the adapter into the weights (faster).", False),
    FamilyOption("attn_implementation", str, "Attention kernel.", None, ATTN_IMPLEMENTATIONS),
    FamilyOption("min_pixels", int, "Minimum pixels per image (Qwen-style processors).", None),
    FamilyOption("max_pixels", int, "Maximum pixels per image (Qwen-style processors).", None),
    FamilyOption("margin", float, "--score pairwise: the challenger must win by more (default 0).", None),
    FamilyOption("max_new_tokens", int, f"--score cloze: tokens per answer (default {DEFAULT_MAX_NEW_TOKENS}).", None),
    FamilyOption("cloze_lexicon", Path, "--score cloze: a JSON lexicon extending the packaged one.", None),
)


@register("vlm")
class VLMReranker(RetrievalModel):
    """A transformers image-text-to-text model scoring (caption, image) pairs with one forward pass each."""

    options: ClassVar[tuple[FamilyOption, ...]] = OPTIONS
    # The engine hands models with this flag to `rerank_pairs` instead of encoding a gallery.
    pair_reranker: ClassVar[bool] = True

    def __init__(
        self,
        folder: Path,
        config: Any,
        processor: Any,
        prompt: PromptSpec,
        score: str,
        answers: Answers,
        adapter: Path | None,
        merge_adapter: bool,
        attn_implementation: str | None,
        mode: ModeOptions | None = None,
    ):
        super().__init__()
        self.folder, self.hf_config, self.processor = folder, config, processor
        self.prompt, self.score, self.answers = prompt, score, answers
        self.adapter, self.merge_adapter, self.attn_implementation = adapter, merge_adapter, attn_implementation
        self.checkpoint_path = folder
        self.mode = mode or ModeOptions()
        self.placeholder = image_placeholder(processor, render(processor, prompt.messages("x")), prompt.images)
        self._loaded: tuple[tuple[str, torch.dtype], torch.nn.Module] | None = None

    @classmethod
    def from_checkpoint(cls, path: Path | None, config: dict[str, Any] | None = None, **options: Any) -> VLMReranker:
        """Check a local transformers folder and the scoring options; the weights load at run time."""
        if path is None:
            raise missing_folder_error(None, "vlm", EXAMPLE)
        if config:
            raise TpasInputError("--config does not apply to vlm: the architecture is the folder's config.json")
        unknown = set(options) - {o.name for o in OPTIONS}
        if unknown:
            raise TpasInputError(f"option --{sorted(unknown)[0].replace('_', '-')} does not apply to vlm")
        folder = Path(path)
        hf_config = read_config(folder)
        score = options.get("score") or "yes-no"
        if score not in SCORE_MODES:
            raise TpasInputError(f"--score {score!r}; expected one of {', '.join(SCORE_MODES)}")
        attn = options.get("attn_implementation")
        if attn is not None and attn not in ATTN_IMPLEMENTATIONS:
            raise TpasInputError(f"--attn-implementation {attn!r}; expected one of {', '.join(ATTN_IMPLEMENTATIONS)}")
        spec = prompt_spec(
            score, options.get("prompt"), options.get("prompt_file"), options.get("system"), options.get("instruction")
        )
        processor = load_processor(folder, options.get("min_pixels"), options.get("max_pixels"))
        answers = resolve_answers(processor.tokenizer, score, options.get("yes"), options.get("no"))
        mode = mode_options(score, options)
        adapter = options.get("adapter")
        if adapter is not None:
            adapter = Path(adapter)
            check_adapter_folder(adapter)
        elif options.get("merge_adapter"):
            raise TpasInputError("--merge-adapter needs --adapter DIR")
        return cls(
            folder, hf_config, processor, spec, score, answers, adapter, bool(options.get("merge_adapter")), attn, mode
        )

    def describe(self) -> dict[str, Any]:
        """Architecture, score mode, prompt, answer tokens and image settings (meta and the score cache key; the
        folder and adapter enter the key by their sha256, not their paths)."""
        archs = getattr(self.hf_config, "architectures", None) or [type(self.hf_config).__name__]
        return {
            "architecture": archs[0],
            "model_type": self.hf_config.model_type,
            "processor": type(self.processor).__name__,
            "score": self.score,
            **self.prompt.describe(),
            **self.answers.describe(),
            **self.mode.describe(self.score),
            "image_processor": image_settings(self.processor.image_processor),
            "attn_implementation": self.attn_implementation,
            "merge_adapter": self.merge_adapter,
        }

    @property
    def image_preprocessor(self) -> ImageSegmenter:
        return ImageSegmenter(self.processor, self.placeholder)

    def network(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        """The transformers model (with its adapter) on `device` in `dtype`, loaded once per (device, dtype)."""
        key = (str(device), dtype)
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = None  # free the previous copy first
            net = load_weights(self.folder, dtype, self.attn_implementation)
            if self.adapter is not None:
                net = apply_adapter(net, self.adapter, self.merge_adapter)
            self._loaded = (key, net.to(device).eval())
        return self._loaded[1]

    def score_batch(self, net: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B] scores of one collated batch (on the model's device)."""
        out = net(**batch, use_cache=False, logits_to_keep=1)
        return score_logits(self.score, out.logits[:, -1], self.answers)

    def rerank_pairs(self, images_dir: str | Path, queries: Any, out: str | Path, **kwargs: Any) -> Any:
        """Run the pair re-ranker (`tpas.models.vlm.runner.rerank_candidates`); the engine's entry point."""
        from .runner import rerank_candidates

        return rerank_candidates(self, images_dir, queries, out, **kwargs)
