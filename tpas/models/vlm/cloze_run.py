"""`--score cloze` (AnomalyLMM's scheme): each query's behaviour and colour words are masked (`tpas.models.vlm.cloze`),
the model fills the blanks from each candidate image by greedy decoding, and the candidate scores the fraction of
blanks it filled with the masked word.

Generation is batched like the pointwise scores (image-ordered pairs, left padding, one processor call per image,
DataLoader workers, torchrun shards); each pair's generated token ids are cached under the run's key (model, adapter,
lexicon, `--max-new-tokens`, image settings, precision) and the caption, so a killed run generates only the missing
answers. Value of the candidate at first-stage position j (0 = best) of K:
`fraction matched + TIE_BREAK x (K - j) / K`: the tie-break term is below any difference of two fractions, so equal
fractions keep the first-stage order, and a caption without any maskable word keeps its first-stage order outright
(no generation for it).
"""

from __future__ import annotations

from typing import Any

import torch

from .batching import Features
from .cloze import cloze_prompt, cloze_score, make_cloze, parse_answers
from .runner import Run, _pairs, score_pairs

TIE_BREAK = 1e-3  # < 1 / (blanks per caption) for any caption shorter than a thousand blanks


def _eos_ids(run: Run) -> set[int]:
    ids = run.net.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    tok = run.model.processor.tokenizer
    return {int(i) for i in [*ids, tok.eos_token_id] if i is not None}


def generate_step(run: Run, max_new_tokens: int):
    """The step of `score_pairs`: greedy answers of one batch as token ids [B, max_new_tokens] (-1 after the end)."""
    tok = run.model.processor.tokenizer
    pad_id = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)
    eos = torch.tensor(sorted(_eos_ids(run)))

    def step(inputs: Features) -> dict[str, torch.Tensor]:
        out = run.net.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                               pad_token_id=pad_id)  # fmt: skip
        new = out[:, inputs["input_ids"].shape[1] :].cpu()
        reply = torch.full((new.shape[0], max_new_tokens), -1, dtype=torch.long)
        reply[:, : new.shape[1]] = new
        ended = torch.isin(reply, eos).cumsum(dim=1) > 0  # the end token and everything after it
        return {"reply": reply.masked_fill(ended, -1)}

    return step


def rerank_cloze(run: Run) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(first-stage indices, cloze values, meta) for the run's candidates."""
    lexicon = run.model.mode.lexicon
    assert lexicon is not None  # mode_options loads it for --score cloze
    clozes = [make_cloze(q.caption, lexicon) for q in run.qs]
    pairs, cells = _pairs(run.qs, run.paths, run.top)
    asked = [p for p in pairs if clozes[p.row].blanks]
    texts = {p.row: cloze_prompt(clozes[p.row]) for p in asked}
    before = sum(run.store.has(p.key) for p in asked)
    score_pairs(run, asked, texts, generate_step(run, run.model.mode.max_new_tokens))
    replies = run.store.load([p.key for p in asked], ["reply"]).get("reply")
    tok = run.model.processor.tokenizer
    fraction: dict[str, float] = {}
    for i, p in enumerate(asked):
        ids = replies[i]
        text = tok.decode(ids[ids >= 0].tolist(), skip_special_tokens=True)
        cloze = clozes[p.row]
        fraction[p.key] = cloze_score(parse_answers(text, len(cloze.blanks)), cloze, lexicon)
    q, k = run.top.shape
    rank_term = TIE_BREAK * (k - torch.arange(k, dtype=torch.float64)) / k
    values = torch.zeros(q, k, dtype=torch.float64)
    for r, row in enumerate(cells):
        if clozes[r].blanks:
            values[r] = torch.tensor([fraction[key] for key in row], dtype=torch.float64)
    values += rank_term
    no_blanks = sum(not c.blanks for c in clozes)
    meta = {
        "cloze": {
            "values": f"fraction of blanks matched + {TIE_BREAK} x (K - first-stage position) / K",
            "queries_without_blanks": no_blanks,
            "blanks": sum(len(c.blanks) for c in clozes),
            "generations": len(asked),
            "generated_here": len(asked) - before if run.dist.world == 1 else None,
            "max_new_tokens": run.model.mode.max_new_tokens,
            "lexicon_sha256": lexicon.digest(),
            "mean_fraction": sum(fraction.values()) / len(fraction) if fraction else None,
        }
    }
    return run.top, values.float(), meta
