"""CMP architecture configuration: every size is a field; the defaults are the released cmp.pth architecture.

`infer_config(state_dict)` reads the architecture back from a checkpoint's tensors (Swin depths, widths, heads from the
relative-position tables, window and image size from the tables and shifted-window masks; BERT width, layer counts,
fusion start, vocabulary; projection and pooling sizes), so `tpas infer cmp --checkpoint F` needs no config file.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CMPConfig:
    """Sizes of the CMP model (Swin image encoder, pose branch, BERT text/fusion encoder, heads) and its input rules.

    The defaults reproduce the released checkpoint: Swin-B (window 7, 224 px, embed 128, depths 2-2-18-2, heads
    4-8-16-32), BERT-base split 6 text + 6 fusion layers with cross-attention to the 1024-wide image tokens, 3-bin
    pooling into 3072-dim BatchNorm+Linear projections to 2048, a 16-head pose cross-attention block.
    """

    # Swin image encoder (also encodes the pose map)
    image_size: int = 224
    patch_size: int = 4
    swin_embed_dim: int = 128
    swin_depths: tuple[int, ...] = (2, 2, 18, 2)
    swin_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 7
    swin_mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    # BERT text encoder (layers [0, text_layers)) and cross encoder (the next fusion_layers layers)
    vocab_size: int = 30522
    text_width: int = 768
    text_layers: int = 6
    fusion_layers: int = 6
    text_heads: int = 12
    text_intermediate: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    text_layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    # Heads
    embed_dim: int = 2048
    pool_bins: int = 3
    itc_dropout: float = 0.5
    temp: float = 0.07
    # Pose branch: pose_block (cross-attention, pose as query) and, when pose_conv, the 3->96->3 conv stem
    pose: bool = True
    pose_conv: bool = True
    pose_conv_width: int = 96
    pose_heads: int = 16
    # Text and image input rules of the reference test pipeline
    max_words: int = 56
    max_tokens: int = 56
    image_mean: tuple[float, float, float] = field(default=CLIP_MEAN)
    image_std: tuple[float, float, float] = field(default=CLIP_STD)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                # Lists from YAML/kwargs become tuples so configs compare (and hash) by value.
                object.__setattr__(self, f.name, tuple(v))
        if len(self.swin_depths) != len(self.swin_heads):
            raise ValueError(f"swin_depths {self.swin_depths} and swin_heads {self.swin_heads} differ in length")
        if self.image_size % (self.patch_size * 2 ** (len(self.swin_depths) - 1)):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by patch_size * 2**(stages-1) = "
                f"{self.patch_size * 2 ** (len(self.swin_depths) - 1)}"
            )
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width {self.text_width} is not a multiple of text_heads {self.text_heads}")
        if self.vision_width % self.pose_heads:
            raise ValueError(f"vision width {self.vision_width} is not a multiple of pose_heads {self.pose_heads}")

    @property
    def vision_width(self) -> int:
        """Width of the final Swin stage (1024 for Swin-B): image tokens, pose block, cross-attention keys."""
        return self.swin_embed_dim * 2 ** (len(self.swin_depths) - 1)

    @property
    def num_text_layers_total(self) -> int:
        """All BERT layers (text + fusion)."""
        return self.text_layers + self.fusion_layers

    @property
    def patch_grid(self) -> int:
        """Side of the final token grid (7 for 224 px Swin-B): the image has patch_grid**2 patch tokens."""
        return self.image_size // (self.patch_size * 2 ** (len(self.swin_depths) - 1))

    @property
    def vision_proj_in(self) -> int:
        """Input width of vision_proj: pool_bins pooled patch features."""
        return self.pool_bins * self.vision_width

    @property
    def text_proj_in(self) -> int:
        """Input width of text_proj: [CLS] plus pool_bins pooled token features."""
        return (self.pool_bins + 1) * self.text_width

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CMPConfig:
        """Build from a dict such as `to_dict()` or a YAML file; unknown keys raise ValueError naming them."""
        return cls(**typed_fields(cls, data, "CMP"))

    @classmethod
    def tiny(cls, **overrides: Any) -> CMPConfig:
        """A few-hundred-thousand-parameter model with the released key names, fast enough to train on a CPU.

        Swin embed 16, depths (1, 1, 2, 1), heads (1, 2, 2, 4), window 2, 64 px (token grids 16/8/4/2, so stage 2 has
        a shifted-window mask in its odd block); BERT width 128 with 2 text + 2 fusion layers, 2 heads (head size 64,
        the rule `infer_config` reads heads back with); projection 64; pose block 2 heads (also head size 64), pose
        conv 8 wide; vocabulary 128 tokens. `infer_config` of its state dict returns exactly this config.
        """
        base = dict(
            image_size=64,
            patch_size=4,
            swin_embed_dim=16,
            swin_depths=(1, 1, 2, 1),
            swin_heads=(1, 2, 2, 4),
            window_size=2,
            vocab_size=128,
            text_width=128,
            text_layers=2,
            fusion_layers=2,
            text_heads=2,
            text_intermediate=256,
            max_position_embeddings=64,
            embed_dim=64,
            pose_conv_width=8,
            pose_heads=2,
            max_words=56,
            max_tokens=56,
        )
        base.update(overrides)
        return cls(**base)


def typed_fields(cls: type, data: dict[str, Any], label: str) -> dict[str, Any]:
    """Keyword arguments for the config dataclass `cls` from a dict or YAML mapping, each coerced to its field's type.

    Unknown keys and wrong types raise ValueError naming them (`label` names the config: "CMP", "X-VLM").
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"unknown {label} config key(s): {', '.join(unknown)}; expected some of {', '.join(sorted(names))}"
        )
    defaults = cls()
    values: dict[str, Any] = {}
    for k, v in data.items():
        want = type(getattr(defaults, k))
        if isinstance(v, list):
            v = tuple(v)
        # YAML 1.1 reads "1e-12" as a string and "4" where a float is meant as an int: coerce to the field type.
        if want is float and isinstance(v, (int, str)) and not isinstance(v, bool):
            try:
                v = float(v)
            except ValueError:
                raise ValueError(f"{k} must be a number, got {v!r}") from None
        if type(v) is not want and not (want is tuple and isinstance(v, tuple)):
            raise ValueError(f"{k} must be {want.__name__}, got {v!r}")
        values[k] = v
    return values


def window_from_table(table_rows: int) -> int:
    """Swin window size from the rows of a relative_position_bias_table ((2 * window - 1) ** 2)."""
    side = math.isqrt(table_rows)
    if side * side != table_rows or side % 2 == 0:
        raise ValueError(f"relative_position_bias_table with {table_rows} rows is not (2*window-1)**2")
    return (side + 1) // 2


def observed_image_size(state_dict: dict[str, torch.Tensor]) -> int | None:
    """Input resolution a Swin state dict pins down, or None when its tensors do not determine it.

    A shifted-window mask [nW, N, N] at stage i gives that stage's grid = sqrt(nW) * window_i; otherwise a stage
    whose window shrank below the others' has grid == its window. Without either (no mask buffers saved and no shrunk
    window) every resolution fits the weights, and the caller's config decides.
    """
    sd = state_dict
    patch = sd["vision_encoder.patch_embed.proj.weight"].shape[-1]
    windows: dict[int, int] = {}
    for k, v in sd.items():
        m = re.match(r"vision_encoder\.layers\.(\d+)\.blocks\.0\.attn\.relative_position_bias_table$", k)
        if m:
            windows[int(m.group(1))] = window_from_table(v.shape[0])
    masks = sorted(
        (int(m.group(1)), int(m.group(2)), k)
        for k in sd
        if (m := re.match(r"vision_encoder\.layers\.(\d+)\.blocks\.(\d+)\.attn_mask$", k))
    )
    for stage, _, key in masks:
        if stage in windows:
            return math.isqrt(sd[key].shape[0]) * windows[stage] * patch * 2**stage
    widest = max(windows.values(), default=0)
    for stage in sorted(windows):
        if windows[stage] < widest:
            return windows[stage] * patch * 2**stage
    return None


def infer_config(state_dict: dict[str, torch.Tensor], base: CMPConfig | None = None) -> CMPConfig:
    """The architecture a CMP state dict (keys as in cmp.pth) was built with.

    Sizes that leave no trace in the tensors (dropouts, temperature init, mlp ratio when it divides evenly, text limits,
    normalisation) come from `base` (default: the released config). Raises ValueError when a required key is missing.
    """
    base = base or CMPConfig()
    sd = state_dict

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise ValueError(f"not a CMP state dict: key {key!r} is missing")
        return tuple(sd[key].shape)

    embed, in_ch, patch, _ = shape("vision_encoder.patch_embed.proj.weight")
    stage_blocks: dict[int, set[int]] = {}
    for k in sd:
        m = re.match(r"vision_encoder\.layers\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            stage_blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not stage_blocks:
        raise ValueError("not a CMP state dict: no vision_encoder.layers.*.blocks.* keys")
    n_stages = max(stage_blocks) + 1
    depths = tuple(max(stage_blocks.get(i, {-1})) + 1 for i in range(n_stages))
    heads, windows = [], []
    for i in range(n_stages):
        rows, h = shape(f"vision_encoder.layers.{i}.blocks.0.attn.relative_position_bias_table")
        heads.append(h)
        windows.append(window_from_table(rows))
    fc1 = shape("vision_encoder.layers.0.blocks.0.mlp.fc1.weight")[0]
    mlp_ratio = fc1 / embed

    # Window: stages whose grid is at least the configured window keep it; smaller grids shrink it to the grid.
    window = max(windows)
    # Image size: a shifted-window mask [nW, N, N] at stage i gives that stage's grid = sqrt(nW) * window_i;
    # otherwise a stage whose window shrank below `window` has grid == its window.
    image_size = observed_image_size(sd) or base.image_size

    vocab, width = shape("text_encoder.bert.embeddings.word_embeddings.weight")
    max_pos = shape("text_encoder.bert.embeddings.position_embeddings.weight")[0]
    type_vocab = shape("text_encoder.bert.embeddings.token_type_embeddings.weight")[0]
    layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"text_encoder\.bert\.encoder\.layer\.(\d+)\.", k))}
    if not layer_ids:
        raise ValueError("not a CMP state dict: no text_encoder.bert.encoder.layer.* keys")
    n_layers = max(layer_ids) + 1
    cross_key = "text_encoder.bert.encoder.layer.{}.crossattention.self.query.weight"
    fusion = [i for i in range(n_layers) if cross_key.format(i) in sd]
    if not fusion:
        raise ValueError("not a CMP state dict: no BERT layer has cross-attention")
    text_layers = min(fusion)
    intermediate = shape("text_encoder.bert.encoder.layer.0.intermediate.dense.weight")[0]
    embed_dim, proj_in = shape("vision_proj.2.weight")
    vision_width = embed * 2 ** (n_stages - 1)
    if proj_in % vision_width:
        raise ValueError(f"vision_proj input {proj_in} is not a multiple of the vision width {vision_width}")
    pose = "pose_block.attn.q.weight" in sd
    pose_conv = "pose_conv.expand.0.weight" in sd
    pose_conv_width = shape("pose_conv.expand.0.weight")[0] if pose_conv else base.pose_conv_width
    if in_ch != 3:
        raise ValueError(f"vision_encoder.patch_embed expects {in_ch} input channels; CMP uses RGB (3)")
    return dataclasses.replace(
        base,
        image_size=image_size,
        patch_size=patch,
        swin_embed_dim=embed,
        swin_depths=depths,
        swin_heads=tuple(heads),
        window_size=window,
        swin_mlp_ratio=mlp_ratio,
        vocab_size=vocab,
        text_width=width,
        text_layers=text_layers,
        fusion_layers=n_layers - text_layers,
        # Head counts leave no trace in the weights: BERT and the pose block use head size 64 (12 and 16 heads in
        # the release); a width that is not a multiple of 64 keeps the base config's count.
        text_heads=width // 64 if width % 64 == 0 else base.text_heads,
        pose_heads=vision_width // 64 if vision_width % 64 == 0 else base.pose_heads,
        text_intermediate=intermediate,
        max_position_embeddings=max_pos,
        type_vocab_size=type_vocab,
        embed_dim=embed_dim,
        pool_bins=proj_in // vision_width,
        pose=pose,
        pose_conv=pose_conv,
        pose_conv_width=pose_conv_width,
    )
