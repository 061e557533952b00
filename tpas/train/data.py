"""Training data for CMP: image + pose map, its identity-based hard negative (image + pose, caption), an EDA view of the
caption and the MLM targets, with the recipe's augmentation; for X-VLM the (image, caption, id) pair alone.

Every random choice of a sample (augmentation, EDA, masking) comes from a generator seeded by (seed, epoch, index), so
a sample is the same whichever worker, rank or resumed run produces it. Augmentation is written with PIL and torch
only (no compiled torchvision ops). The original code's transform (the default): resize to S x S (bicubic),
horizontal flip (p 0.5), normalise, random erasing (p 0.6, area 2-40 %, aspect uniform in [0.3, 1/0.3], value 0),
and no RandAugment; every image, hard image and pose map gets its own draw of it (`pose: independent`). Opt-in:
RandAugment-style ops (`randaug_n` > 0) and pose maps that follow their image's flip and geometric ops and are never
erased (`pose: follow-image`). X-VLM's transform (dataset/__init__.py `train_transform`) adds a random resized crop
(`crop_scale`, aspect ratio in [3/4, 4/3], torchvision's rule) in place of the plain resize.

`select_pairs` keeps the records of the images a list file names (`data.subset`).
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from ..data.pab import TrainRecord, read_id_lines
from ..errors import TpasInputError
from ..models.cmp.text import clean_caption
from .masking import MaskingConfig, mask_tokens
from .text_aug import eda

POSE_MODES = ("independent", "follow-image")
# torchvision RandomResizedCrop's defaults: aspect ratios drawn log-uniformly from [3/4, 4/3], 10 tries.
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10


@dataclass(frozen=True)
class AugmentConfig:
    """Image/text augmentation of the training set (defaults = the original code's transform)."""

    hflip: float = 0.5
    randaug_n: int = 0  # RandAugment-style ops drawn per image (0: none, as the original)
    randaug_m: int = 7  # magnitude 0..10
    random_erasing: float = 0.6  # probability
    erasing_area: tuple[float, float] = (0.02, 0.4)  # erased fraction of the image, drawn uniformly
    erasing_aspect: float = 0.3  # erased rectangle's height/width drawn uniformly from [a, 1/a]
    pose: str = "independent"  # independent | follow-image (see the module docstring)
    eda: bool = True
    eda_alpha: float = 0.1
    crop_scale: tuple[float, float] | None = None  # random resized crop's area range (X-VLM: 0.5-1); None: resize

    def __post_init__(self) -> None:
        if self.pose not in POSE_MODES:
            raise TpasInputError(f"augment.pose {self.pose!r}; expected one of {', '.join(POSE_MODES)}")
        lo, hi = (float(v) for v in self.erasing_area)
        if not 0 < lo <= hi < 1:
            raise TpasInputError(f"augment.erasing_area must be [min, max] with 0 < min <= max < 1, not [{lo}, {hi}]")
        if not 0 < self.erasing_aspect <= 1:
            raise TpasInputError(f"augment.erasing_aspect must be in (0, 1] (the range is [a, 1/a]), not "
                                 f"{self.erasing_aspect}")  # fmt: skip
        object.__setattr__(self, "erasing_area", (lo, hi))
        if self.crop_scale is not None:
            lo, hi = (float(v) for v in self.crop_scale)
            if not 0 < lo <= hi <= 1:
                raise TpasInputError(f"augment.crop_scale must be null or [min, max] with 0 < min <= max <= 1, not "
                                     f"[{lo}, {hi}]")  # fmt: skip
            object.__setattr__(self, "crop_scale", (lo, hi))


def load_rgb(path: Path, where: str = "") -> Image.Image:
    """Open an image file as RGB; TpasInputError naming the file (and record) when it is missing or unreadable."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise TpasInputError("image file not found", path, where or None) from None
    except OSError as e:
        raise TpasInputError(f"cannot read image ({e})", path, where or None) from None


def to_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """PIL RGB -> normalised float tensor [3, H, W]."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
    return x.sub_(torch.tensor(mean).view(3, 1, 1)).div_(torch.tensor(std).view(3, 1, 1))


class TrainTransform:
    """Resize (or random resized crop), flip, optional RandAugment-style ops, normalise, random erasing (see the
    module docstring). `size` is S (S x S) or (height, width)."""

    COLOUR_OPS = ("identity", "autocontrast", "equalize", "brightness", "sharpness", "contrast")
    GEOMETRIC_OPS = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")
    # Tries to place a rectangle inside the image before giving up on erasing it (the original's count).
    ERASING_TRIES = 100

    def __init__(
        self, size: int | Sequence[int], mean: Sequence[float], std: Sequence[float], cfg: AugmentConfig
    ) -> None:
        self.hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.mean, self.std, self.cfg = tuple(mean), tuple(std), cfg

    def _geometric(self, img: Image.Image, op: str, v: float, fill: tuple[int, int, int]) -> Image.Image:
        h, w = self.hw
        if op == "shear_x":
            return img.transform(img.size, Image.AFFINE, (1, v * 0.3, 0, 0, 1, 0), Image.BILINEAR, fillcolor=fill)
        if op == "shear_y":
            return img.transform(img.size, Image.AFFINE, (1, 0, 0, v * 0.3, 1, 0), Image.BILINEAR, fillcolor=fill)
        if op == "translate_x":
            return img.transform(img.size, Image.AFFINE, (1, 0, v * 0.3 * w, 0, 1, 0), fillcolor=fill)
        if op == "translate_y":
            return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, v * 0.3 * h), fillcolor=fill)
        return img.rotate(v * 30.0, resample=Image.BILINEAR, fillcolor=fill)

    @staticmethod
    def _colour(img: Image.Image, op: str, v: float) -> Image.Image:
        if op == "autocontrast":
            return ImageOps.autocontrast(img)
        if op == "equalize":
            return ImageOps.equalize(img)
        if op == "brightness":
            return ImageEnhance.Brightness(img).enhance(1 + 0.9 * v)
        if op == "sharpness":
            return ImageEnhance.Sharpness(img).enhance(1 + 0.9 * v)
        if op == "contrast":
            return ImageEnhance.Contrast(img).enhance(1 + 0.9 * v)
        return img

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """A random resized crop's box (left, top, right, bottom): area fraction in `crop_scale`, aspect ratio
        log-uniform in [3/4, 4/3]; after 10 misses the centred box of the clamped ratio (torchvision's rule)."""
        lo, hi = self.cfg.crop_scale or (1.0, 1.0)
        area = width * height
        for _ in range(CROP_TRIES):
            target = area * rng.uniform(lo, hi)
            ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
            cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < cw <= width and 0 < ch <= height:
                top, left = rng.randint(0, height - ch), rng.randint(0, width - cw)
                return left, top, left + cw, top + ch
        ratio = min(max(width / height, CROP_RATIO[0]), CROP_RATIO[1])
        cw, ch = (width, round(width / ratio)) if width / height <= ratio else (round(height * ratio), height)
        left, top = (width - cw) // 2, (height - ch) // 2
        return left, top, left + cw, top + ch

    def erase(self, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """Zero one random rectangle of `x` [C, H, W] in place (area and aspect drawn uniformly, as the original)."""
        _, h, w = x.shape
        lo, hi = self.cfg.erasing_area
        a = self.cfg.erasing_aspect
        for _ in range(self.ERASING_TRIES):
            area = h * w * rng.uniform(lo, hi)
            ratio = rng.uniform(a, 1 / a)
            eh, ew = round((area * ratio) ** 0.5), round((area / ratio) ** 0.5)
            if eh < h and ew < w:
                top, left = rng.randint(0, h - eh), rng.randint(0, w - ew)
                x[:, top : top + eh, left : left + ew] = 0
                return x
        return x

    def _augment(
        self, image: Image.Image, rng: random.Random, fill: tuple[int, int, int], follower: Image.Image | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One draw of the transform for `image`; `follower` (a pose map) takes its flip and geometric ops only."""
        h, w = self.hw
        if self.cfg.crop_scale is not None:
            box = self.crop_box(image.width, image.height, rng)
            image = image.crop(box)
            follower = None if follower is None else follower.crop(box)
        image = image.resize((w, h), Image.BICUBIC)
        follower = None if follower is None else follower.resize((w, h), Image.BICUBIC)
        if rng.random() < self.cfg.hflip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            follower = None if follower is None else follower.transpose(Image.FLIP_LEFT_RIGHT)
        ops = self.COLOUR_OPS + self.GEOMETRIC_OPS
        for _ in range(self.cfg.randaug_n):
            op = ops[rng.randrange(len(ops))]
            if rng.random() >= 0.5:  # each drawn op is applied with probability 0.5 (RandomAugment of ALBEF/APTM)
                continue
            v = self.cfg.randaug_m / 10.0 * (1 if rng.random() < 0.5 else -1)
            if op in self.GEOMETRIC_OPS:
                image = self._geometric(image, op, v, fill)
                follower = None if follower is None else self._geometric(follower, op, v, (0, 0, 0))
            else:
                image = self._colour(image, op, v)
        x = to_tensor(image, self.mean, self.std)
        if rng.random() < self.cfg.random_erasing:
            x = self.erase(x, rng)
        return x, None if follower is None else to_tensor(follower, self.mean, self.std)

    def __call__(
        self, image: Image.Image, pose: Image.Image | None, rng: random.Random
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment one image and its pose map -> normalised tensors [3, S, S] (pose per `cfg.pose`)."""
        if self.cfg.pose == "follow-image":
            return self._augment(image, rng, (128, 128, 128), follower=pose)
        x, _ = self._augment(image, rng, (128, 128, 128))
        return x, None if pose is None else self._augment(pose, rng, (0, 0, 0))[0]


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator of one sample: a function of (seed, epoch, index) only (str seeds hash with sha512, stable)."""
    return random.Random(f"tpas-train:{seed}:{epoch}:{index}")


class CMPTrainDataset(torch.utils.data.Dataset):
    """PAB training records -> dicts of tensors (see the module docstring); `set_epoch` changes the random draws.

    `root` is the PAB root: images at `root/<image>`, hard negatives at `root/train/<hard_i>`, pose maps at
    `root/pose/<image>` and `root/pose/train/<hard_i>`. `pair_only` (X-VLM) gives just image, text_ids, text_mask
    and idx. `clean_caption`: the model's caption rule before tokenizing (default: the tokenizer's own, CMP's).
    """

    def __init__(
        self,
        records: Sequence[TrainRecord],
        root: str | Path,
        tokenizer: Any,
        transform: TrainTransform,
        *,
        pose: bool,
        masking: MaskingConfig = MaskingConfig(),
        seed: int = 0,
        ihnm: bool = True,
        pair_only: bool = False,
        clean_caption: Callable[[str], str] | None = None,
    ) -> None:
        if not records:
            raise TpasInputError("no training records", root)
        self.records = list(records)
        self.root = Path(root)
        self.tokenizer = tokenizer
        self.transform = transform
        self.pose = pose
        self.masking = masking
        self.seed = seed
        self.ihnm = ihnm
        self.pair_only = pair_only
        self.clean_caption = clean_caption
        self.epoch = 0
        # Identity-aware ITC targets compare integer ids: one per distinct image_id (hard_i_ids included).
        ids = sorted({r.image_id for r in self.records} | {r.hard_i_id for r in self.records if r.hard_i_id})
        self.id_index = {x: i for i, x in enumerate(ids)}
        specials = [tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id]
        unk = getattr(getattr(tokenizer, "_tok", None), "unk_token_id", None)
        self.special_ids = [s for s in [*specials, unk] if s is not None]

    def set_epoch(self, epoch: int) -> None:
        """Use the random draws of `epoch` (augmentation, EDA, masking)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def _image_pair(self, rel: Path, where: str, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor | None]:
        image = load_rgb(self.root / rel, where)
        pose = load_rgb(self.root / "pose" / rel, where) if self.pose else None
        return self.transform(image, pose, rng)

    def _encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask [N, L] of `captions`, each distinct one tokenized once (the Python WordPiece
        tokenizer is a large share of a tiny model's step, and without EDA or IHNM a record's three are one)."""
        distinct = list(dict.fromkeys(captions))
        if self.clean_caption is None:
            tok = self.tokenizer(distinct)
        else:
            tok = self.tokenizer([self.clean_caption(c) for c in distinct], clean=False)
        rows = torch.tensor([distinct.index(c) for c in captions])
        return {k: v[rows] for k, v in tok.items()}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        r = self.records[index]
        where = f"record {index} (image_id {r.image_id})"
        rng = sample_rng(self.seed, self.epoch, index)
        image, pose = self._image_pair(Path(r.image), where, rng)
        idx = torch.tensor(self.id_index[r.image_id], dtype=torch.long)
        if self.pair_only:
            try:
                tok = self._encode([r.caption])
            except ValueError as e:
                raise TpasInputError(f"caption cannot be used ({e})", None, where) from None
            return {"image": image, "text_ids": tok["input_ids"][0], "text_mask": tok["attention_mask"][0], "idx": idx}
        has_hard = self.ihnm and bool(r.hard_i) and bool(r.hard_c)
        if has_hard:
            hard_image, hard_pose = self._image_pair(Path("train") / str(r.hard_i), where + " hard_i", rng)
            hard_caption = str(r.hard_c)
        else:
            hard_image, hard_pose = torch.zeros_like(image), None if pose is None else torch.zeros_like(pose)
            hard_caption = r.caption
        try:
            eda_caption = r.caption
            if self.transform.cfg.eda:
                # As the original: EDA on the cleaned caption (all of it), then the tokenizer cuts to max_words.
                eda_caption = eda(clean_caption(r.caption, max_words=sys.maxsize), rng, self.transform.cfg.eda_alpha)
            tok = self._encode([r.caption, hard_caption, eda_caption])
        except ValueError as e:
            raise TpasInputError(f"caption cannot be used ({e})", None, where) from None
        ids, att = tok["input_ids"], tok["attention_mask"]
        masked = mask_tokens(
            ids[0],
            att[0],
            self.tokenizer.convert_ids_to_tokens(ids[0].tolist()),
            rng,
            self.masking,
            mask_token_id=self.tokenizer.mask_token_id,
            special_ids=self.special_ids,
            vocab_size=self.tokenizer.vocab_size,
        )
        out = {
            "image": image,
            "hard_image": hard_image,
            "text_ids": ids[0],
            "text_mask": att[0],
            "hard_ids": ids[1],
            "hard_mask": att[1],
            "eda_ids": ids[2],
            "eda_mask": att[2],
            "mlm_ids": masked.input_ids,
            "mlm_pos": masked.masked_pos,
            "mlm_labels": masked.masked_ids,
            "idx": idx,
            "hard_idx": torch.tensor(self.id_index.get(r.hard_i_id or "", -1), dtype=torch.long),
            "has_hard": torch.tensor(has_hard),
        }
        if pose is not None:
            out["pose"] = pose
            out["hard_pose"] = hard_pose  # type: ignore[assignment]
        return out


def select_pairs(records: Sequence[TrainRecord], list_file: str | Path) -> list[TrainRecord]:
    """The records of the images `list_file` names: one annotation `image` path per line (as the training
    annotation writes it, e.g. `train/imgs_0/12.jpg`), every pair of that image kept, annotation order kept.

    A line naming no training image, a duplicate or a blank line inside raises TpasInputError with its line number.
    """
    lines = read_id_lines(list_file, "image path")
    known = {r.image.replace("\\", "/") for r in records}
    for n, line in enumerate(lines, 1):
        if line.replace("\\", "/") not in known:
            raise TpasInputError(f"image {line!r} is not in the training annotation", list_file, f"line {n}")
    wanted = {line.replace("\\", "/") for line in lines}
    return [r for r in records if r.image.replace("\\", "/") in wanted]
