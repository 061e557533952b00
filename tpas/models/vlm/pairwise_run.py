"""`--score pairwise`: pivot-promote (`tpas.models.vlm.pairwise`) over each query's top-K, with the model comparing
two candidate images per prompt.

Each round of pivot-promote asks 2 x Q comparisons [first image, second image] (every query's pivot against its next
challenger, in both orders); `PairComparer` scores them in batches of `--batch-size` two-image rows, left-padded, both
images' visual tokens spliced at their placeholders (`tpas.models.vlm.batching`). The margin logit("1") - logit("2")
of each comparison is stored in the score cache under (caption, first image, second image) on top of the run's key
(model, adapter, prompt, answer tokens, image settings, precision): a killed run replays the rounds it finished from
the cache and takes the same decisions. Under torchrun every rank scores a share of each round's comparisons, then
all ranks read the round's margins from the shared store before deciding. Each round decodes the images it needs
again (a pivot is decoded once per round): rounds are few (K - 1) and holding the images of all rounds would not fit.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import closing
from typing import Any

import torch

from ...errors import TpasInputError
from ..cache import item_key
from ..engine import InferProgress
from .batching import Features, PromptTokens, assemble, check_assembly, image_axes, reference_inputs, tokenize_prompt
from .pairwise import Comparison, pivot_promote
from .prompts import render
from .runner import Run, caption_digest


class PairComparer:
    """The `compare` function of pivot-promote for one run: margins of (row, first column, second column)."""

    def __init__(self, run: Run):
        self.run = run
        try:
            self.image_keys = {c: item_key(run.paths[c]) for c in run.top.unique().tolist()}
        except FileNotFoundError as e:
            raise TpasInputError("candidate image not found (vanished from the gallery?)", e.filename) from None
        self.digests = [caption_digest(q.caption) for q in run.qs]
        self.rendered: dict[int, str] = {}
        self.prompts: dict[int, PromptTokens] = {}
        self.axes: dict[str, int] | None = None  # how the processor joins two images' tensors (found on first use)
        self.asked = 0  # comparisons asked by pivot-promote (both orders)
        self.scored = 0  # comparisons this process ran through the model (not from the cache)
        self.t0 = time.perf_counter()

    def key(self, comp: Comparison) -> str:
        r, a, b = comp
        return f"{self.digests[r]}|{self.image_keys[a]}|{self.image_keys[b]}"

    def __call__(self, comps: Sequence[Comparison]) -> list[float]:
        run = self.run
        keys = [self.key(c) for c in comps]
        unique = list(dict(zip(keys, comps, strict=True)).items())  # a repeated caption's comparison is scored once
        mine = [unique[i] for i in run.dist.shard(len(unique))]
        todo = [(k, c) for k, c in mine if not run.store.has(k)]
        self._score(todo, len(comps) - len(todo))
        run.dist.barrier()
        run.store.scan()  # other ranks' chunks
        self.asked += len(comps)
        return run.store.load(keys, ["margin"])["margin"].tolist()

    def prompt(self, row: int) -> PromptTokens:
        if row not in self.prompts:
            model = self.run.model
            self.rendered[row] = render(model.processor, model.prompt.messages(self.run.qs[row].caption))
            self.prompts[row] = tokenize_prompt(model.processor, self.rendered[row], model.placeholder, images=2)
        return self.prompts[row]

    def forward(self, comps: Sequence[Comparison], inputs: Features) -> torch.Tensor:
        """[B] margins of one collated batch of comparisons (the model's "1" minus "2" score)."""
        return self.run.model.score_batch(self.run.net, inputs)

    def _score(self, todo: list[tuple[str, Comparison]], known: int) -> None:
        """Score `todo` in batches; each batch's distinct images are decoded for it (one loader for the round)."""
        run = self.run
        batches = [todo[i : i + run.batch_size] for i in range(0, len(todo), run.batch_size)]
        need = [list(dict.fromkeys(col for _, (_, a, b) in batch for col in (a, b))) for batch in batches]
        base = self.asked + known
        with closing(run.load_images([c for cols in need for c in cols])) as images:
            for batch, cols in zip(batches, need, strict=True):
                held = dict(next(images) for _ in cols)
                comps = [c for _, c in batch]
                if self.axes is None:
                    self._check(comps[0], held)
                rows = [assemble(self.prompt(r), [held[a], held[b]], self.axes) for r, a, b in comps]
                with torch.inference_mode():
                    margins = self.forward(comps, run.inputs(rows)).float().cpu()
                run.store.write_chunk([k for k, _ in batch], {"margin": margins})
                self.scored += len(batch)
                if run.progress:
                    rate = self.scored / max(time.perf_counter() - self.t0, 1e-9)
                    total = 2 * len(run.qs) * (run.top.shape[1] - 1)
                    run.progress(InferProgress("rerank", base + self.scored, total, rate, base))

    def _check(self, comp: Comparison, held: dict[int, Features]) -> None:
        """The processor's own output for one two-image row: how it joins the images, and that splicing equals it."""
        r, a, b = comp
        self.prompt(r)
        ref = reference_inputs(self.run.model.processor, self.rendered[r], [self.run.paths[a], self.run.paths[b]])
        self.axes = image_axes(ref, [held[a], held[b]])
        check_assembly(self.run.model.processor, ref, assemble(self.prompts[r], [held[a], held[b]], self.axes))


def rerank_pairwise(run: Run) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(order, values, meta) of pivot-promote over the run's candidates; values are K - position (pairwise.py)."""
    comparer = PairComparer(run)
    if run.progress:
        total = 2 * len(run.qs) * (run.top.shape[1] - 1)
        run.progress(InferProgress("rerank", 0, total, 0.0, 0))
    margin = run.model.mode.margin
    res = pivot_promote(run.top, comparer, margin)
    k = run.top.shape[1]
    meta = {
        "pairwise": {
            "margin": margin,
            "values": "K - position in the decided order (pivots last-promoted first, then first-stage order)",
            "calls_per_query": 2 * (k - 1),
            "calls": res.calls,
            "scored_here": comparer.scored,
            "promotions": int(res.promotions.sum()),
            "queries_promoted": int((res.promotions > 0).sum()),
        }
    }
    return res.order, res.values, meta
