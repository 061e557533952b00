"""BLIP-2 Q-Former retrieval (LAVIS `blip2_feature_extractor` / `Blip2ITM`) on transformers' implementation.

The network is `transformers.Blip2ForImageTextRetrieval`, loaded from a transformers directory (what
`tpas convert blip2-lavis` writes, or an HF `blip2-itm-*` download). What LAVIS does and the HF classes do not
express is restored from the directory's `config.json` `lavis` block: the `ln_vision` eps (1e-5, HF uses the block
eps) and, for `pretrain_vitL`, CLIP's `ln_pre`, applied by a forward hook on `vision_model.embeddings`.

Scores, as LAVIS computes them (docs/models/blip2.md):
- ITC: image = normalize(vision_proj(query outputs)) [G, 32, 256], text = normalize(text_proj([CLS])) [Q, 256];
  score = max over the 32 query tokens (`itc_score="max"`), or query token 0 only (`"first-token"`, what the seed
  script computed).
- ITM: the joint query+text pass over the ViT output, `itm_head` on each of the 32 query outputs, logits averaged
  over queries, softmax[:, 1]. Text cut to 32 tokens as `Blip2ITM.forward` does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import TpasInputError
from .base import TRUST_CHECKPOINT, VOCAB, FamilyOption, Features, RetrievalModel, register
from .checkpoint import WEIGHT_KINDS, load_checkpoint, sniff
from .tta import TTA_MATCH_OPTION, check_tta, encode_views, with_tta

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ITC_SCORES = ("max", "first-token")
DEFAULT_MAX_WORDS = 50  # LAVIS blip_caption processor, eval
DEFAULT_MAX_TXT_LEN = 32  # Blip2ITM.forward truncation
LN_PRE_FILE = "lavis_ln_pre.safetensors"
_STRIP_CHARS = re.compile(r"([.!\"()*#:;~])")
_MULTI_SPACE = re.compile(r"\s{2,}")


def clean_caption(caption: str, max_words: int = DEFAULT_MAX_WORDS) -> str:
    """LAVIS `blip_caption` text processing: lowercase, drop `. ! " ( ) * # : ; ~`, squeeze spaces, cut words.

    Commas, apostrophes, `?` and `-` are kept; runs of two or more whitespace characters become one space (a single
    tab or newline stays); only trailing newlines and surrounding spaces are stripped; then the first `max_words`
    space-separated words are kept.
    """
    caption = _STRIP_CHARS.sub(" ", caption.lower())
    caption = _MULTI_SPACE.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


class Blip2Preprocess:
    """Picklable test-time image transform: Resize((S, S), BICUBIC) on PIL, ToTensor, OpenAI CLIP mean/std.

    The same operations in the same order as LAVIS `blip_image_eval` (torchvision on a PIL image), written with
    PIL + torch so it does not depend on torchvision or on transformers' image processors.
    """

    def __init__(
        self, image_size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD
    ):
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """[3, S, S] float32 tensor."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
        x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        x = x.to(torch.float32).div(255)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return x.sub_(mean).div_(std)

    def describe(self) -> dict[str, Any]:
        """JSON-able description (for meta and the feature-cache key)."""
        return {
            "resize": [self.image_size, self.image_size],
            "interpolation": "bicubic",
            "crop": None,
            "mean": list(self.mean),
            "std": list(self.std),
        }


def _find_weights(directory: Path) -> list[Path]:
    """The weight files of a transformers directory: single or sharded safetensors, else pytorch_model.bin."""
    import json

    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise TpasInputError(f"unreadable shard index ({type(e).__name__}: {e})", index) from None
            # Shards are file names inside the folder: anything else (a number, a path out of it) is a broken index.
            bad = next((s for s in shards if not isinstance(s, str) or Path(s).name != s or s in ("", ".", "..")), None)
            if bad is not None or not shards:
                what = f"names {bad!r}, not a file in this folder" if shards else "lists no weight files"
                raise TpasInputError(f"shard index {what}", index)
            return [directory / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    raise TpasInputError("no weights found (expected model.safetensors or pytorch_model.bin)", directory)


# Architecture keys a --config may state; each must agree with the checkpoint directory.
_CONFIG_KEYS = {
    "family",
    "model_type",
    "vit_model",
    "image_size",
    "patch_size",
    "num_query_tokens",
    "embed_dim",
    "max_txt_len",
    "max_words",
    "vision",
    "qformer",
    "itc_score",
    "ln_pre",
}
_VISION_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "patch_size",
    "image_size",
    "hidden_act",
    "layer_norm_eps",
)
_QFORMER_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "cross_attention_frequency",
    "max_position_embeddings",
)


class Blip2Pixels:
    """What DataLoader workers run per image: `{"pixel_values": transform(image)}`; picklable, no weights."""

    def __init__(self, transform: Blip2Preprocess):
        self.transform = transform

    def __call__(self, image: Image.Image, pose: Image.Image | None = None) -> Features:
        return {"pixel_values": self.transform(image)}


@register("blip2")
class Blip2Model(RetrievalModel):
    """BLIP-2 Q-Former ITC + ITM (LAVIS pretrain / pretrain_vitL) on `Blip2ForImageTextRetrieval`."""

    has_match_head: ClassVar[bool] = True
    bf16_modules = ("hf.vision_model",)  # as under GPU autocast: the Q-Former, projections and ITM head stay fp32
    options = (
        FamilyOption(
            "itc_score",
            str,
            "ITC over the query tokens: max (LAVIS) or first-token (token 0 only); default: the config's, else max.",
            choices=ITC_SCORES,
        ),
        VOCAB,
        TRUST_CHECKPOINT,
        TTA_MATCH_OPTION,
    )

    def __init__(
        self,
        hf_model: Any,
        tokenizer: Any,
        lavis: dict[str, Any],
        *,
        itc_score: str = "max",
        checkpoint: Path | None = None,
        tta: str = "none",
    ):
        super().__init__()
        if itc_score not in ITC_SCORES:
            raise TpasInputError(f"--itc-score must be one of {', '.join(ITC_SCORES)}, got {itc_score!r}")
        self.hf = hf_model
        self.tokenizer = tokenizer
        self.lavis = dict(lavis)
        self.itc_score = itc_score
        self.tta = check_tta(tta)
        self.checkpoint_path = checkpoint
        vcfg = hf_model.config.vision_config
        self.max_txt_len = int(self.lavis.get("max_txt_len", DEFAULT_MAX_TXT_LEN))
        self.max_words = int(self.lavis.get("max_words", DEFAULT_MAX_WORDS))
        self.max_text_positions = int(hf_model.config.qformer_config.max_position_embeddings)
        self._preprocess = Blip2Preprocess(int(vcfg.image_size))
        # LAVIS ln_vision uses eps 1e-5; HF's post_layernorm takes the ViT block eps (1e-6 for EVA).
        self.hf.vision_model.post_layernorm.eps = float(self.lavis.get("ln_vision_eps", 1e-5))
        self.ln_pre: torch.nn.LayerNorm | None = None
        if self.lavis.get("ln_pre"):
            self.ln_pre = torch.nn.LayerNorm(int(vcfg.hidden_size), eps=float(self.lavis.get("ln_pre_eps") or 1e-5))
            # CLIP applies ln_pre to [cls; patches] + pos before the first block; Blip2VisionModel has no such slot.
            self.hf.vision_model.embeddings.register_forward_hook(self._apply_ln_pre)

    def _apply_ln_pre(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        assert self.ln_pre is not None
        return self.ln_pre(output)

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_checkpoint(cls, path: Path | None, config: dict[str, Any] | None = None, **options: Any) -> Blip2Model:
        """Load a transformers BLIP-2 retrieval directory offline; architecture from its config.json.

        Options: `itc_score` ("max" | "first-token"), `vocab` (a vocab.txt overriding the directory's),
        `trust_checkpoint` (allow pickled `pytorch_model.bin`). A `config` that disagrees with the directory is refused.
        """
        from transformers import Blip2Config, Blip2ForImageTextRetrieval

        from .blip2_convert import load_tokenizer

        if path is None:
            raise TpasInputError(
                "BLIP-2 needs --checkpoint DIR, a transformers directory; convert the LAVIS release with "
                "`tpas convert blip2-lavis blip2_pretrained_vitL.pth --vit clip_vit_L.pth --out DIR`"
            )
        path = Path(path)
        if path.is_file():
            kind = sniff(path)
            if kind.kind not in WEIGHT_KINDS:  # a failed download, not a LAVIS file: say what it is
                raise TpasInputError(kind.refusal(), path)
            raise TpasInputError(
                "BLIP-2 loads a transformers directory, not a single file; for a LAVIS checkpoint run "
                f"`tpas convert blip2-lavis {path.name} --vit eva_vit_g.pth|clip_vit_L.pth --out DIR` first",
                path,
            )
        if not (path / "config.json").is_file():
            raise TpasInputError("not a transformers directory (config.json missing)", path)
        try:
            hf_config = Blip2Config.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # transformers raises several types for a malformed config
            raise TpasInputError(f"unreadable BLIP-2 config ({str(e).splitlines()[0]})", path / "config.json") from None
        if getattr(hf_config, "model_type", None) != "blip-2":
            raise TpasInputError(f"config.json is model_type {hf_config.model_type!r}, expected 'blip-2'", path)
        if not hf_config.qformer_config.use_qformer_text_input:
            raise TpasInputError("config has use_qformer_text_input=false: not a retrieval (ITM) Q-Former", path)
        lavis = dict(getattr(hf_config, "lavis", None) or {})
        # Our forward passes never prepend image tokens; a hub config's image_token_index must not strip text ids.
        hf_config.image_token_index = None

        trust = bool(options.get("trust_checkpoint", False))
        state: dict[str, torch.Tensor] = {}
        for f in _find_weights(path):
            obj = load_checkpoint(f, trust=trust)
            if not isinstance(obj, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
            ):
                raise TpasInputError("weights file does not hold a state dict (a mapping of names to tensors)", f)
            state.update(obj)
        with torch.device("meta"):
            model = Blip2ForImageTextRetrieval(hf_config)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
            raise TpasInputError(
                f"weights do not match the config ({len(missing)} missing, {len(unexpected)} unexpected keys; {what})",
                path,
            )
        for key, tensor in state.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise TpasInputError(
                    f"tensor {key!r} has shape {list(tensor.shape)}, config expects {list(expected[key].shape)}", path
                )
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
        # The non-persistent position_ids buffer is not in the file; rebuild it off the meta device.
        emb = model.embeddings
        emb.position_ids = torch.arange(emb.position_embeddings.num_embeddings).expand((1, -1))
        model.eval()

        vocab = options.get("vocab")
        vocab_path = Path(vocab) if vocab is not None else path / "vocab.txt"
        if vocab is None and not vocab_path.is_file():
            raise TpasInputError(
                "no vocab.txt in the checkpoint directory; pass --vocab bert-base-uncased-vocab.txt", path
            )
        tokenizer = load_tokenizer(vocab_path)
        if len(tokenizer) > hf_config.qformer_config.vocab_size:
            raise TpasInputError(
                f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                f"{hf_config.qformer_config.vocab_size}",
                vocab_path,
            )

        obj = cls(
            model,
            tokenizer,
            lavis,
            itc_score=options.get("itc_score") or (config or {}).get("itc_score") or "max",
            checkpoint=path,
            tta=options.get("tta") or "none",
        )
        if obj.ln_pre is not None:
            ln_file = path / LN_PRE_FILE
            if not ln_file.is_file():
                raise TpasInputError(f"config.json says ln_pre but {LN_PRE_FILE} is missing", path)
            ln_state = load_checkpoint(ln_file)
            try:
                obj.ln_pre.load_state_dict(
                    {k.removeprefix("ln_pre."): v.float() for k, v in ln_state.items()}, strict=True
                )
            except RuntimeError as e:
                raise TpasInputError(f"ln_pre weights do not fit ({str(e).splitlines()[0]})", ln_file) from None
        elif hf_config.vision_config.hidden_act == "quick_gelu":
            # A CLIP tower without its ln_pre computes something LAVIS never did: refuse rather than drift silently.
            raise TpasInputError(
                "a CLIP (quick_gelu) vision tower needs its ln_pre weights (config lavis.ln_pre + "
                f"{LN_PRE_FILE}); convert with `tpas convert blip2-lavis`",
                path,
            )
        if config:
            obj._check_config(config, path)
        return obj.eval()

    def architecture(self) -> dict[str, Any]:
        """Architecture facts read from the loaded directory (what a --config is compared against)."""
        cfg = self.hf.config
        v, q = cfg.vision_config, cfg.qformer_config
        return {
            "family": "blip2",
            "model_type": self.lavis.get("model_type"),
            "vit_model": self.lavis.get("vit_model"),
            "image_size": int(v.image_size),
            "patch_size": int(v.patch_size),
            "num_query_tokens": int(cfg.num_query_tokens),
            "embed_dim": int(cfg.image_text_hidden_size),
            "max_txt_len": self.max_txt_len,
            "max_words": self.max_words,
            "ln_pre": self.ln_pre is not None,
            "vision": {k: getattr(v, k) for k in _VISION_KEYS},
            "qformer": {k: getattr(q, k) for k in _QFORMER_KEYS},
        }

    def _check_config(self, config: dict[str, Any], path: Path) -> None:
        unknown = set(config) - _CONFIG_KEYS
        if unknown:
            raise TpasInputError(f"unknown BLIP-2 config key(s): {', '.join(sorted(unknown))}")
        arch = self.architecture()
        for key, want in config.items():
            if key == "itc_score":
                continue  # a scoring default, not architecture; --itc-score wins when both are given
            if isinstance(want, dict):
                sub = arch[key]
                for k, w in want.items():
                    if k not in sub:
                        raise TpasInputError(f"unknown BLIP-2 config key {key}.{k}")
                    if not _same(sub[k], w):
                        raise TpasInputError(
                            f"config says {key}.{k}={w!r} but the checkpoint has {sub[k]!r}; refusing to run", path
                        )
            elif not _same(arch[key], want):
                raise TpasInputError(
                    f"config says {key}={want!r} but the checkpoint has {arch[key]!r}; refusing to run", path
                )

    def describe(self) -> dict[str, Any]:
        """Architecture, preprocessing, tokenizer and scoring choices (SimsMatrix meta and cache key)."""
        return {
            **self.architecture(),
            "ln_vision_eps": float(self.hf.vision_model.post_layernorm.eps),
            "itc_score": self.itc_score,
            "tta": self.tta,
            "preprocess": self._preprocess.describe(),
            "tokenizer": {"vocab_size": len(self.tokenizer), "bos": "[DEC]", "itm_max_length": self.max_txt_len},
        }

    # ------------------------------------------------------------------------------------------ preprocessing
    def preprocess(self, image: Image.Image, pose: Image.Image | None = None) -> Features:
        """{"pixel_values": [3, S, S]}: LAVIS `blip_image_eval` (no crop); with TTA, the image and its mirror."""
        return self.image_preprocessor(image, None)

    @property
    def image_preprocessor(self) -> Callable[[Image.Image, Image.Image | None], Features]:
        """The picklable LAVIS transform that DataLoader workers run (no weights inside), with the mirror for TTA."""
        return with_tta(Blip2Pixels(self._preprocess), self.tta)

    def clean(self, texts: Sequence[str]) -> list[str]:
        """LAVIS `blip_caption` cleaning of each caption."""
        return [clean_caption(t, self.max_words) for t in texts]

    def tokenize(self, texts: Sequence[str]) -> Features:
        """Cleaned captions as BERT ids: full length for ITC (LAVIS `extract_features` does not truncate), and
        cut to `max_txt_len` (32, ending in [SEP]) and padded to it for ITM, as `Blip2ITM.forward` does."""
        cleaned = self.clean(texts)
        itc = self.tokenizer(
            cleaned, padding="longest", truncation=True, max_length=self.max_text_positions, return_tensors="pt"
        )
        itm = self.tokenizer(
            cleaned, padding="max_length", truncation=True, max_length=self.max_txt_len, return_tensors="pt"
        )
        return {
            "input_ids": itc["input_ids"],
            "attention_mask": itc["attention_mask"],
            "itm_input_ids": itm["input_ids"],
            "itm_attention_mask": itm["attention_mask"],
        }

    # --------------------------------------------------------------------------------------------- encoding
    def _device(self) -> torch.device:
        return self.hf.query_tokens.device

    def _qformer_fp32(self) -> torch.autocast:
        """LAVIS runs only the ViT under autocast on GPU; the Q-Former, projections and ITM head stay fp32."""
        return torch.autocast(self._device().type, enabled=False)

    def encode_vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ViT output after ln_vision: [N, 1 + patches, width] (the image side of ITM)."""
        dtype = self.hf.vision_model.embeddings.patch_embedding.weight.dtype
        return self.hf.vision_model(pixel_values=pixel_values.to(self._device(), dtype)).last_hidden_state

    def query_outputs(self, vision: torch.Tensor) -> torch.Tensor:
        """Q-Former outputs of the learned queries attending to one image each: [N, num_query_tokens, hidden]."""
        queries = self.hf.query_tokens.expand(vision.shape[0], -1, -1)
        mask = torch.ones(vision.shape[:-1], dtype=torch.long, device=vision.device)
        with self._qformer_fp32():
            return self.hf.qformer(
                query_embeds=queries, encoder_hidden_states=vision.float(), encoder_attention_mask=mask
            ).last_hidden_state

    def encode_images(self, batch: Features) -> Features:
        """{"embed": normalised vision_proj of the query outputs [N, 32, 256], "vision": ViT output for ITM}; with
        TTA, each query token's `embed` averages the two views and `vision` is the plain view's."""

        def encode(b: Features) -> Features:
            vision = self.encode_vision(b["pixel_values"])
            queries = self.query_outputs(vision)
            with self._qformer_fp32():
                embed = F.normalize(self.hf.vision_projection(queries), dim=-1)
            return {"embed": embed, "vision": vision}

        return encode_views(encode, batch, self.tta)

    def encode_texts(self, tokens: Features) -> Features:
        """{"embed": normalised text_proj of [CLS] [N, 256]} plus the ITM ids that `match` needs."""
        device = self._device()
        ids = tokens["input_ids"].to(device)
        mask = tokens["attention_mask"].to(device)
        with self._qformer_fp32():
            hidden = self.hf.qformer(
                query_embeds=self.hf.embeddings(input_ids=ids), query_length=0, attention_mask=mask
            ).last_hidden_state
            embed = F.normalize(self.hf.text_projection(hidden[:, 0, :]), dim=-1)
        return {
            "embed": embed,
            "itm_input_ids": tokens["itm_input_ids"],
            "itm_attention_mask": tokens["itm_attention_mask"],
        }

    # ---------------------------------------------------------------------------------------------- scoring
    def similarity(self, text_embed: torch.Tensor, image_embed: torch.Tensor) -> torch.Tensor:
        """[Q, G] ITC: max over query tokens of (query token . text [CLS]), or token 0 only for `first-token`."""
        text = text_embed.float()
        if self.itc_score == "first-token":
            return text @ image_embed[:, 0, :].float().T
        g, k, d = image_embed.shape
        out = torch.empty(text.shape[0], g, dtype=torch.float32, device=text.device)
        # Chunk the gallery so the [Q, chunk, 32] intermediate stays near 64M floats whatever Q and G are.
        step = max(1, (1 << 26) // max(1, text.shape[0] * k))
        for start in range(0, g, step):
            block = image_embed[start : start + step].float().to(text.device)
            out[:, start : start + step] = (text @ block.reshape(-1, d).T).view(text.shape[0], -1, k).amax(-1)
        return out

    def match_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        """ITM logits [N, 2]: itm_head on each query output of the joint pass, averaged over the queries."""
        device = self._device()
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        vision = vision.to(device).float()
        n, nq = input_ids.shape[0], self.hf.query_tokens.shape[1]
        queries = self.hf.query_tokens.expand(n, -1, -1)
        mask = torch.cat([torch.ones(n, nq, dtype=attention_mask.dtype, device=device), attention_mask], dim=1)
        image_mask = torch.ones(vision.shape[:-1], dtype=torch.long, device=device)
        with self._qformer_fp32():
            hidden = self.hf.qformer(
                query_embeds=self.hf.embeddings(input_ids=input_ids, query_embeds=queries),
                query_length=nq,
                attention_mask=mask,
                encoder_hidden_states=vision,
                encoder_attention_mask=image_mask,
            ).last_hidden_state
            return self.hf.itm_head(hidden[:, :nq, :]).mean(dim=1)

    def match(self, text: Features, image: Features) -> torch.Tensor:
        """ITM match probability [N] for paired rows (text i with image i), softmax[:, 1] of the averaged logits."""
        logits = self.match_logits(text["itm_input_ids"], text["itm_attention_mask"], image["vision"])
        return logits.float().softmax(dim=-1)[:, 1]


def _same(have: Any, want: Any) -> bool:
    if isinstance(have, float) or isinstance(want, float):
        try:
            return abs(float(have) - float(want)) <= 1e-12 + 1e-9 * abs(float(want))
        except (TypeError, ValueError):
            return False
    if isinstance(have, (list, tuple)) and isinstance(want, (list, tuple)):
        return list(have) == list(want)
    return have == want
