"""VLM re-ranking: score each query's candidate images with a vision-language model (docs/models/vlm.md)."""

from .family import VLMReranker

__all__ = ["VLMReranker"]
