"""What the model reads for one (caption, image) pair: the chat messages of each score mode, rendered with the
processor's own chat template and its generation prompt.

Pointwise modes (`yes-no`, `p-yes`): an optional system turn, then one user turn holding [image, prompt text] in that
order, the prompt being the user's template with `{caption}` replaced. `qwen3-vl-reranker`: the message layout of the
scoring script shipped with Qwen3-VL-Reranker (docs/models/vlm.md): a fixed judge instruction as system turn, and a
user turn "<Instruct>: ..." + "<Query>:" + caption + "\\n<Document>:" + image. `pairwise`: one user turn
"Image 1:" + first image + "Image 2:" + second image + the prompt. `cloze`: one user turn [image, the cloze question
of `tpas.models.vlm.cloze.cloze_prompt`] (the question takes the place of the caption; no template of the user's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import TpasInputError

CAPTION_FIELD = "{caption}"
DEFAULT_PROMPT = 'Does this image show the following description? "{caption}" Answer yes or no.'
RERANKER_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
RERANKER_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."
DEFAULT_PAIRWISE_PROMPT = (
    'Which image shows the following description better? "{caption}" Answer 1 for the first image or 2 for the '
    "second image."
)

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class PromptSpec:
    """The text around each caption: `template` (with `{caption}`) and `system` for pointwise modes, or the
    reranker's `instruction` (and system text) when `reranker` is set."""

    template: str = DEFAULT_PROMPT
    system: str | None = None
    instruction: str | None = None
    reranker: bool = False
    images: int = 1  # 2 for pairwise: [first image, second image, prompt]

    def messages(self, caption: str) -> Messages:
        """The chat messages for one pair; the image item stands where the processor inserts the picture."""
        out: Messages = []
        if self.reranker:
            out.append({"role": "system", "content": [{"type": "text", "text": self.system or RERANKER_SYSTEM}]})
            content = [
                {"type": "text", "text": "<Instruct>: " + (self.instruction or RERANKER_INSTRUCTION)},
                {"type": "text", "text": "<Query>:"},
                {"type": "text", "text": caption},
                {"type": "text", "text": "\n<Document>:"},
                {"type": "image"},
            ]
        else:
            if self.system:
                out.append({"role": "system", "content": [{"type": "text", "text": self.system}]})
            # str.replace, not str.format: captions and prompts may hold other braces.
            text = {"type": "text", "text": self.template.replace(CAPTION_FIELD, caption)}
            if self.images == 2:
                content = [{"type": "text", "text": "Image 1:"}, {"type": "image"},
                           {"type": "text", "text": "Image 2:"}, {"type": "image"}, text]  # fmt: skip
            else:
                content = [{"type": "image"}, text]
        out.append({"role": "user", "content": content})
        return out

    def describe(self) -> dict[str, Any]:
        """JSON-able identity (goes into meta and the score cache key)."""
        if self.reranker:
            return {"system": self.system or RERANKER_SYSTEM, "instruction": self.instruction or RERANKER_INSTRUCTION}
        return {"prompt": self.template, "system": self.system}


def prompt_spec(
    score: str,
    prompt: str | None = None,
    prompt_file: str | Path | None = None,
    system: str | None = None,
    instruction: str | None = None,
) -> PromptSpec:
    """Validate the prompt options for `score`; TpasInputError naming the option at fault."""
    if prompt is not None and prompt_file is not None:
        raise TpasInputError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise TpasInputError("prompt file not found", path)
        prompt = path.read_text(encoding="utf-8").strip("\n")
    if score == "qwen3-vl-reranker":
        if prompt is not None:
            raise TpasInputError(
                "--prompt/--prompt-file do not apply to --score qwen3-vl-reranker (its layout is fixed; use "
                "--instruction)"
            )
        return PromptSpec(system=system, instruction=instruction, reranker=True)
    if instruction is not None:
        raise TpasInputError(f"--instruction applies to --score qwen3-vl-reranker only, not {score}")
    if score == "cloze":
        if prompt is not None:
            raise TpasInputError("--prompt/--prompt-file do not apply to --score cloze (the question is the cloze)")
        return PromptSpec(template=CAPTION_FIELD, system=system)
    default = DEFAULT_PAIRWISE_PROMPT if score == "pairwise" else DEFAULT_PROMPT
    template = default if prompt is None else prompt
    if CAPTION_FIELD not in template:
        where = prompt_file if prompt_file is not None else None
        raise TpasInputError(f"the prompt must contain {CAPTION_FIELD} where the query text goes: {template!r}", where)
    return PromptSpec(template=template, system=system, images=2 if score == "pairwise" else 1)


def render(processor: Any, messages: Messages) -> str:
    """The prompt text as the processor's chat template renders it, ending with the generation prompt."""
    from jinja2 import TemplateError

    try:
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except (TemplateError, ValueError, TypeError) as e:
        raise TpasInputError(f"the processor's chat template cannot render the prompt ({e})") from None
