"""Synthetic mini-PAB: a small, seeded dataset that behaves like PAB, in the real PAB file layouts.

Every image shows one procedurally drawn person (head, hair, torso, arms, legs built from an 18-keypoint OpenPose
COCO-18 skeleton) with appearance attributes (upper/lower clothing colour, hair colour, build), doing a normal action
(standing, walking, running, jumping) or an anomalous one (falling, lying, slipping, being hit), each a different pose,
over a scene background. Every identity appears twice, once normal and once anomalous, in the same clothes and
scene: exactly PAB's identity-based hard negative pairs (`hard_i` / `hard_c`). Captions come from templates with
synonyms; pose maps are rendered from the figure's own keypoints with `tpas.pose.render.render_pose_map`.

Layout written under `root` (see `PAB_FORMATS.md`)::

    annotation/train/attr_0.json ...          training records (image, caption, image_id, hard_i, hard_c, ...)
    annotation/val/attr.json                  validation split, test format (tune on this, never on test)
    annotation/test/attr.json               test split: [{image, image_id, caption: [...], normal|anomaly, scene}]
    train/imgs_K/{goal,full}/N.jpg            training images (goal = normal, full = anomalous)
    val/N.jpg  test/N.jpg                     validation / test images
    pose/<same relative path>                 pose maps of every image above
    name-masked_test-set/gallery/<ID>.jpg     test images under 15-character ids + distractor images
    name-masked_test-set/query.json           JSON lines {"query_index", "caption"}
    name-masked_test-set/query_index.txt      one query id per line (answer order)
    name-masked_test-set/ground_truth.json    the masked set's truth, test format (image = gallery/<ID>.jpg)
    pose/name-masked_test-set/gallery/...     pose maps of the gallery
    vocab.txt                                 WordPiece vocabulary trained on every caption ([PAD] = 0)

The same seed and arguments always produce byte-identical files.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import TpasInputError

Progress = Callable[[int, int], None]

# ---------------------------------------------------------------------------------------------------------------
# Vocabulary of the world: colours, actions, scenes and the words that describe them.

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 35),
    "blue": (30, 60, 200),
    "green": (35, 150, 50),
    "yellow": (235, 210, 40),
    "black": (25, 25, 25),
    "white": (240, 240, 240),
    "grey": (128, 128, 128),
    "orange": (240, 130, 20),
    "purple": (120, 40, 160),
    "pink": (240, 140, 190),
    "brown": (110, 70, 35),
}
HAIR_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (20, 18, 18),
    "brown": (90, 55, 25),
    "blonde": (225, 195, 110),
    "grey": (165, 165, 165),
    "red": (170, 60, 25),
}
SKIN_TONES: tuple[tuple[int, int, int], ...] = ((240, 200, 170), (200, 150, 110), (140, 95, 60), (95, 60, 40))
BUILDS: dict[str, float] = {"slim": 0.8, "average": 1.0, "heavyset": 1.3}

NORMAL_ACTIONS = ("standing", "walking", "running", "jumping")
ANOMALOUS_ACTIONS = ("falling", "lying", "slipping", "being hit")
ACTION_LABELS = {
    "standing": "Standing",
    "walking": "Walking",
    "running": "Running",
    "jumping": "Jumping",
    "falling": "Falling",
    "lying": "Lying",
    "slipping": "Slipping",
    "being hit": "Being hit",
}
FRAMINGS = ("scene", "person")  # how much of the image the person fills (`_place`)
SCENES = ("parking lot", "lawn", "gym", "beach", "street", "snowy slope")

# (finite forms, gerund forms): "a man ... falls on a lawn" / "the image shows a man ... falling on a lawn".
ACTION_PHRASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "standing": (("stands", "is standing", "stands still"), ("standing", "standing still")),
    "walking": (("walks", "is walking", "strolls"), ("walking", "strolling")),
    "running": (("runs", "is running", "jogs quickly"), ("running", "jogging quickly")),
    "jumping": (("jumps", "is jumping", "leaps into the air"), ("jumping", "leaping into the air")),
    "falling": (("falls", "is falling over", "trips and falls"), ("falling", "falling over", "tripping and falling")),
    "lying": (("lies on the ground", "is lying down", "lies flat"), ("lying on the ground", "lying down")),
    "slipping": (("slips", "slips and loses balance", "is slipping"), ("slipping", "slipping and losing balance")),
    "being hit": (
        ("is hit by a ball", "gets struck by a flying object", "is hit by an object"),
        ("being hit by a ball", "getting struck by a flying object"),
    ),
}
SCENE_PHRASES: dict[str, tuple[str, ...]] = {
    "parking lot": ("on a parking lot", "in a car park", "in a wet parking lot"),
    "lawn": ("on a lawn", "on a grassy field", "on a patch of grass"),
    "gym": ("in a gym", "in a fitness hall", "inside an indoor gym"),
    "beach": ("on a beach", "on a sandy shore", "by the sea"),
    "street": ("on a street", "on a city road", "in the street"),
    "snowy slope": ("on a snowy slope", "on a ski slope", "in the snow"),
}
SUBJECTS = {
    "man": ("a man", "a young man", "a guy"),
    "woman": ("a woman", "a young woman", "a lady"),
}
UPPER_GARMENTS = ("jacket", "shirt", "top", "sweater", "coat")
LOWER_GARMENTS = ("trousers", "pants", "jeans", "shorts", "skirt")
OPENINGS = ("The image shows", "In the picture we see", "This photo shows", "There is")

# OpenPose COCO-18 keypoint order.
KEYPOINT_NAMES = (
    "nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist",
    "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear",
)  # fmt: skip

# Pose of each action in body-frame angles (degrees from "down along the torso", positive towards the figure's
# left side): tilt of the whole body, then (upper, lower) segment angles of right arm, left arm, right leg, left leg,
# and how far the hips are lifted off the ground (in body heights).
_POSES: dict[str, dict[str, object]] = {
    "standing": {"tilt": 0, "r_arm": (-12, -6), "l_arm": (12, 6), "r_leg": (-4, -3), "l_leg": (4, 3), "lift": 0.0},
    "walking": {"tilt": 4, "r_arm": (25, 40), "l_arm": (-20, -10), "r_leg": (-22, -30), "l_leg": (22, 12), "lift": 0.0},
    "running": {"tilt": 15, "r_arm": (-45, 50), "l_arm": (50, 110), "r_leg": (50, -5), "l_leg": (-35, -80),
                "lift": 0.05},
    "jumping": {"tilt": 0, "r_arm": (-155, -170), "l_arm": (155, 170), "r_leg": (-30, 15), "l_leg": (30, -15),
                "lift": 0.18},
    "falling": {"tilt": 58, "r_arm": (-115, -140), "l_arm": (100, 135), "r_leg": (-12, -25), "l_leg": (28, 45),
                "lift": 0.0},
    "lying": {"tilt": 90, "r_arm": (-25, -15), "l_arm": (25, 15), "r_leg": (-5, 0), "l_leg": (5, 0), "lift": 0.0},
    "slipping": {"tilt": -32, "r_arm": (-130, -100), "l_arm": (125, 155), "r_leg": (80, 70), "l_leg": (-10, -5),
                 "lift": 0.0},
    "being hit": {"tilt": 28, "r_arm": (-150, -115), "l_arm": (45, 150), "r_leg": (-18, -5), "l_leg": (12, 22),
                  "lift": 0.0},
}  # fmt: skip

# Segment lengths in body heights.
_TORSO, _NECK, _UPPER_ARM, _FOREARM, _THIGH, _SHIN = 0.31, 0.11, 0.15, 0.14, 0.22, 0.22
_SHOULDER_HALF, _HIP_HALF, _HEAD_R = 0.085, 0.06, 0.065


@dataclass(frozen=True)
class Person:
    """Appearance of one synthetic identity."""

    gender: str
    upper: str
    lower: str
    upper_garment: str
    lower_garment: str
    hair: str
    build: str
    skin: int
    scene: str


@dataclass
class MiniPab:
    """Paths of a generated mini-PAB and its sizes."""

    root: Path
    train_annotations: list[Path]
    val_annotation: Path
    test_annotation: Path
    pose_dir: Path
    gallery_dir: Path
    query_json: Path
    query_index: Path
    ground_truth: Path
    vocab: Path
    n_train_pairs: int
    n_val_images: int
    n_test_images: int
    n_gallery: int
    meta: dict[str, object] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Poses and drawing.


def _direction(up: np.ndarray, side: np.ndarray, degrees: float) -> np.ndarray:
    """Unit vector at `degrees` from 'down along the torso', turning towards `side`."""
    a = math.radians(degrees)
    return -up * math.cos(a) + side * math.sin(a)


def pose_keypoints(action: str, rng: np.random.Generator, build: float = 1.0) -> np.ndarray:
    """Keypoints [18, 3] (x, y, confidence) of `action` in body units (height ~1, y down), hips at the origin.

    Angles get a few degrees of jitter and the figure is mirrored at random (it faces either way).
    """
    spec = _POSES[action]
    facing = 1.0 if rng.random() < 0.5 else -1.0

    def jit(value: float, amount: float = 7.0) -> float:
        return facing * (value + rng.uniform(-amount, amount))

    tilt = math.radians(jit(float(spec["tilt"]), 5.0))  # type: ignore[arg-type]
    up = np.array([math.sin(tilt), -math.cos(tilt)])
    side = np.array([math.cos(tilt), math.sin(tilt)])  # the figure's left, seen from the front
    hip = np.zeros(2)
    neck = hip + up * _TORSO
    nose = neck + up * _NECK
    kp = np.zeros((18, 3))
    kp[:, 2] = 1.0
    sh, hh = _SHOULDER_HALF * build, _HIP_HALF * build
    points = {
        "nose": nose,
        "neck": neck,
        "r_shoulder": neck - side * sh,
        "l_shoulder": neck + side * sh,
        "r_hip": hip - side * hh,
        "l_hip": hip + side * hh,
        "r_eye": nose + up * 0.02 - side * 0.022,
        "l_eye": nose + up * 0.02 + side * 0.022,
        "r_ear": nose - side * 0.045,
        "l_ear": nose + side * 0.045,
    }
    for limb, (root, mid, end, lengths) in {
        "r_arm": ("r_shoulder", "r_elbow", "r_wrist", (_UPPER_ARM, _FOREARM)),
        "l_arm": ("l_shoulder", "l_elbow", "l_wrist", (_UPPER_ARM, _FOREARM)),
        "r_leg": ("r_hip", "r_knee", "r_ankle", (_THIGH, _SHIN)),
        "l_leg": ("l_hip", "l_knee", "l_ankle", (_THIGH, _SHIN)),
    }.items():
        a1, a2 = spec[limb]  # type: ignore[misc]
        points[mid] = points[root] + _direction(up, side, jit(a1)) * lengths[0]
        points[end] = points[mid] + _direction(up, side, jit(a2)) * lengths[1]
    for i, name in enumerate(KEYPOINT_NAMES):
        kp[i, :2] = points[name]
    # OpenPose often misses the ears; mimic that so pose maps vary like real ones.
    for i in (16, 17):
        if rng.random() < 0.3:
            kp[i, 2] = 0.0
    kp[:, 1] -= float(spec["lift"])  # type: ignore[arg-type]
    return kp


def _place(
    kp: np.ndarray, size: tuple[int, int], lift: float, rng: np.random.Generator, framing: str = "scene"
) -> tuple[np.ndarray, float]:
    """Scale and move body-unit keypoints into the image: feet on the ground line, fitting inside the frame.

    framing "scene": the body is about half the image height, a person in a wider view; "person": the figure fills
    the frame as in a pedestrian detector's box (its larger side ~90 % of the image), as PAB's person crops do.
    """
    w, h = size
    xy = kp[:, :2]
    # The head circle and hair reach beyond the nose; include them in the extent.
    lo = xy.min(axis=0) - _HEAD_R
    hi = xy.max(axis=0) + _HEAD_R
    extent = hi - lo
    out = kp.copy()
    if framing == "person":
        # Centred in the box, a few pixels of jitter; the box's aspect is the image's, so the short side has margin.
        scale = min(0.92 * w / extent[0], 0.92 * h / extent[1]) * rng.uniform(0.94, 1.0)
        shift = rng.uniform(-0.03, 0.03, size=2) * np.array([w, h])
        out[:, :2] = (xy - (lo + hi) / 2) * scale + np.array([w / 2, h / 2]) + shift
        return out, scale
    scale = min(h * rng.uniform(0.5, 0.6), 0.9 * w / extent[0], 0.8 * h / extent[1])
    ground = h * rng.uniform(0.86, 0.92)
    centre_x = w * 0.5 + rng.uniform(-0.08, 0.08) * w
    bottom = hi[1] + lift  # the lift was already subtracted, so the lowest point sits `lift` above the ground
    out[:, 0] = (xy[:, 0] - (lo[0] + hi[0]) / 2) * scale + centre_x
    out[:, 1] = (xy[:, 1] - bottom) * scale + ground
    # Keep the whole figure inside the frame even after the random offsets.
    top = (lo[1] - bottom) * scale + ground
    if top < 1:
        out[:, 1] += 1 - top
    return out, scale


def _background(scene: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A scene background with a distinct colour layout and texture per scene type."""
    w, h = size
    img = Image.new("RGB", size)
    d = ImageDraw.Draw(img)
    horizon = int(h * rng.uniform(0.35, 0.5))
    if scene == "parking lot":
        d.rectangle([0, 0, w, horizon], fill=(150, 150, 160))
        d.rectangle([0, horizon, w, h], fill=(85, 85, 90))
        for x in range(int(rng.integers(0, 10)), w, max(6, w // 5)):
            d.line([x, horizon + 4, x, h], fill=(235, 235, 235), width=1)
    elif scene == "lawn":
        d.rectangle([0, 0, w, horizon], fill=(140, 190, 240))
        for i, y in enumerate(range(horizon, h, max(3, h // 16))):
            d.rectangle([0, y, w, y + max(3, h // 16)], fill=(60, 150, 60) if i % 2 else (80, 170, 70))
    elif scene == "gym":
        d.rectangle([0, 0, w, horizon], fill=(225, 215, 190))
        d.rectangle([0, horizon, w, h], fill=(185, 130, 75))
        for y in range(horizon, h, max(3, h // 20)):
            d.line([0, y, w, y], fill=(150, 100, 55), width=1)
    elif scene == "beach":
        d.rectangle([0, 0, w, horizon], fill=(120, 180, 235))
        d.rectangle([0, horizon, w, horizon + h // 8], fill=(30, 100, 170))
        d.rectangle([0, horizon + h // 8, w, h], fill=(225, 200, 145))
    elif scene == "street":
        x = 0
        while x < w:
            bw = int(rng.integers(max(4, w // 6), max(5, w // 3)))
            shade = int(rng.integers(90, 200))
            d.rectangle([x, 0, x + bw, horizon], fill=(shade, shade - 20, shade - 40))
            x += bw
        d.rectangle([0, horizon, w, h], fill=(55, 55, 60))
        mid = (horizon + h) // 2
        for x0 in range(0, w, max(6, w // 4)):
            d.line([x0, mid, x0 + max(3, w // 8), mid], fill=(240, 220, 60), width=1)
    elif scene == "snowy slope":
        d.rectangle([0, 0, w, h], fill=(200, 220, 240))
        d.polygon([(0, horizon + h // 6), (w, horizon - h // 10), (w, h), (0, h)], fill=(245, 248, 252))
    else:  # pragma: no cover - SCENES is closed
        raise ValueError(scene)
    arr = np.asarray(img, dtype=np.int16)
    noise = rng.integers(-6, 7, size=arr.shape, dtype=np.int16)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))


def _draw_person(img: Image.Image, kp: np.ndarray, scale: float, person: Person, action: str) -> None:
    """Draw the figure from its placed keypoints: legs, torso, arms, head and hair."""
    d = ImageDraw.Draw(img)
    build = BUILDS[person.build]
    upper, lower = COLOURS[person.upper], COLOURS[person.lower]
    skin, hair = SKIN_TONES[person.skin], HAIR_COLOURS[person.hair]
    p = {name: (float(kp[i, 0]), float(kp[i, 1])) for i, name in enumerate(KEYPOINT_NAMES)}
    leg_w = max(2, round(0.075 * scale * build))
    arm_w = max(1, round(0.05 * scale * build))
    for hip, knee, ankle in (("r_hip", "r_knee", "r_ankle"), ("l_hip", "l_knee", "l_ankle")):
        # A skirt is drawn as a trapezoid over the thighs; trousers cover the whole leg.
        d.line([p[hip], p[knee], p[ankle]], fill=lower if person.lower_garment != "shorts" else skin, width=leg_w)
        if person.lower_garment == "shorts":
            d.line([p[hip], p[knee]], fill=lower, width=leg_w)
        r = max(1, leg_w // 2)
        d.ellipse([p[ankle][0] - r, p[ankle][1] - r, p[ankle][0] + r, p[ankle][1] + r], fill=(30, 30, 30))
    d.polygon([p["r_shoulder"], p["l_shoulder"], p["l_hip"], p["r_hip"]], fill=upper)
    if person.lower_garment == "skirt":
        hip_mid = np.mean([p["r_hip"], p["l_hip"]], axis=0)
        knee_mid = np.mean([p["r_knee"], p["l_knee"]], axis=0)
        hem = hip_mid + (knee_mid - hip_mid) * 0.8
        across = np.array(p["l_hip"]) - np.array(p["r_hip"])
        d.polygon(
            [p["r_hip"], p["l_hip"], tuple(hem + across * 0.9), tuple(hem - across * 0.9)],
            fill=lower,
        )
    for sh, el, wr in (("r_shoulder", "r_elbow", "r_wrist"), ("l_shoulder", "l_elbow", "l_wrist")):
        d.line([p[sh], p[el], p[wr]], fill=upper, width=arm_w)
        r = max(1, arm_w // 2 + 1)
        d.ellipse([p[wr][0] - r, p[wr][1] - r, p[wr][0] + r, p[wr][1] + r], fill=skin)
    neck, nose = np.array(p["neck"]), np.array(p["nose"])
    d.line([p["neck"], p["nose"]], fill=skin, width=arm_w)
    hr = max(2.0, _HEAD_R * scale)
    d.ellipse([nose[0] - hr, nose[1] - hr, nose[0] + hr, nose[1] + hr], fill=skin)
    # Hair: a cap on the far side of the head from the neck, so it follows the head's orientation.
    away = nose - neck
    away = away / (np.linalg.norm(away) + 1e-9)
    cap = nose + away * hr * 0.45
    d.ellipse([cap[0] - hr * 0.95, cap[1] - hr * 0.75, cap[0] + hr * 0.95, cap[1] + hr * 0.75], fill=hair)
    if action == "being hit":
        # The object that hits the person, next to the head.
        ball = nose + np.array([hr * 2.2, -hr * 0.8])
        br = max(2.0, hr * 0.7)
        d.ellipse([ball[0] - br, ball[1] - br, ball[0] + br, ball[1] + br], fill=(250, 250, 250), outline=(20, 20, 20))


# ---------------------------------------------------------------------------------------------------------------
# Captions.


def describe(person: Person, action: str, rng: np.random.Generator) -> str:
    """One caption of `person` doing `action`, drawn from templates with synonyms."""

    def pick(options: tuple[str, ...] | list[str]) -> str:
        return options[int(rng.integers(len(options)))]

    subject = pick(SUBJECTS[person.gender])
    if person.build != "average" and rng.random() < 0.5:
        subject = subject.replace("a ", f"a {'slim' if person.build == 'slim' else 'heavyset'} ", 1)
    upper = f"{person.upper} {person.upper_garment}"
    upper = ("an " if upper[0] in "aeiou" else "a ") + upper
    lower = f"{person.lower} {person.lower_garment}"
    clothing = pick(
        (
            f"in {upper} and {lower}",
            f"wearing {upper} and {lower}",
            f"dressed in {upper} and {lower}",
            f"with {upper} and {lower}",
        )
    )
    hair = pick(("", f" with {person.hair} hair", f" and {person.hair} hair"))
    if hair.startswith(" and") and clothing.startswith("in "):
        hair = f" with {person.hair} hair"
    scene = pick(SCENE_PHRASES[person.scene])
    finite, gerund = ACTION_PHRASES[action]
    if rng.random() < 0.5:
        text = f"{subject} {clothing}{hair} {pick(finite)} {scene}"
        return text[0].upper() + text[1:] + "."
    return f"{pick(OPENINGS)} {subject} {clothing}{hair} {pick(gerund)} {scene}."


def _source_caption(person: Person, action: str) -> str:
    """The short 'source video' caption PAB records beside each pair."""
    verb = {
        "standing": "was standing",
        "walking": "was walking",
        "running": "was running",
        "jumping": "was jumping",
        "falling": "fell down",
        "lying": "was lying on the ground",
        "slipping": "slipped",
        "being hit": "got hit by a ball",
    }[action]
    return f"{person.gender} {verb} {SCENE_PHRASES[person.scene][0]}"


# ---------------------------------------------------------------------------------------------------------------
# Generation.


def _random_person(rng: np.random.Generator, used: set[Person]) -> Person:
    """A new identity whose appearance differs from every identity drawn before (same seed -> same sequence)."""
    colours = list(COLOURS)
    for _ in range(1000):
        gender = "man" if rng.random() < 0.5 else "woman"
        lowers = LOWER_GARMENTS if gender == "woman" else LOWER_GARMENTS[:4]
        upper, lower = rng.choice(len(colours), size=2, replace=False)
        person = Person(
            gender=gender,
            upper=colours[int(upper)],
            lower=colours[int(lower)],
            upper_garment=UPPER_GARMENTS[int(rng.integers(len(UPPER_GARMENTS)))],
            lower_garment=lowers[int(rng.integers(len(lowers)))],
            hair=list(HAIR_COLOURS)[int(rng.integers(len(HAIR_COLOURS)))],
            build=list(BUILDS)[int(rng.integers(len(BUILDS)))],
            skin=int(rng.integers(len(SKIN_TONES))),
            scene=SCENES[int(rng.integers(len(SCENES)))],
        )
        if person not in used:
            used.add(person)
            return person
    raise TpasInputError("too many identities for the synthetic attribute space; ask for fewer")


def render_sample(
    person: Person, action: str, size: tuple[int, int], rng: np.random.Generator, framing: str = "scene"
) -> tuple[Image.Image, Image.Image, np.ndarray]:
    """Draw `person` doing `action` over their scene (`framing` as in `_place`). Returns (image, pose map,
    keypoints [18, 3] in pixels)."""
    from ..pose.render import render_pose_map

    kp = pose_keypoints(action, rng, BUILDS[person.build])
    lift = float(_POSES[action]["lift"])  # type: ignore[arg-type]
    placed, scale = _place(kp, size, lift, rng, framing)
    img = _background(person.scene, size, rng)
    _draw_person(img, placed, scale, person, action)
    # OpenPose draws 4-px limbs on ~500-px frames; scale the strokes down with our small images.
    stroke = max(1, round(min(size) / 32))
    pose = render_pose_map(placed.astype(np.float32), size=size, stick_width=stroke, radius=stroke)
    return img, pose.convert("RGB"), placed


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)


def _masked_id(rng: np.random.Generator, used: set[str]) -> str:
    """A 15-character upper-case id as the name-masked challenge set uses."""
    letters = np.array(list(string.ascii_uppercase))
    while True:
        ident = "".join(letters[rng.integers(0, 26, size=15)])
        if ident not in used:
            used.add(ident)
            return ident


def train_wordpiece_vocab(captions: list[str], path: Path, vocab_size: int = 2000) -> Path:
    """Write a BERT-compatible WordPiece vocabulary (uncased; [PAD]=0, [UNK], [CLS], [SEP], [MASK]) for `captions`.

    Text goes through the `tokenizers` BERT normaliser and pre-tokenizer (lower case, accents stripped, punctuation
    split), exactly as BertTokenizer(do_lower_case=True) sees it. The vocabulary holds every character (also as a
    `##` continuation, so any word can be spelled) and then the most frequent whole words up to `vocab_size`. The
    WordPiece trainer of `tokenizers` breaks frequency ties in hash order, which would make the file differ from run
    to run; counting words here keeps the same captions -> the same bytes.
    """
    from collections import Counter

    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    norm = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True)
    pre = BertPreTokenizer()
    words: Counter[str] = Counter()
    for caption in captions:
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(caption)))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # Every ASCII letter, digit and punctuation mark too, so queries written by hand never fall back to [UNK].
    chars = sorted({c for w in words for c in w} | set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab = specials + chars + ["##" + c for c in chars]
    budget = max(0, vocab_size - len(vocab))
    ranked = sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w))[:budget]
    vocab += sorted(ranked)
    _write(path, "".join(token + "\n" for token in vocab))
    return path


class _Sink:
    """Where a mini-PAB is being written: the root, the image size and framing, every caption so far, and the
    progress count."""

    def __init__(self, root: Path, size: tuple[int, int], framing: str, total: int, progress: Progress | None) -> None:
        self.root, self.size, self.framing, self.total, self.progress = root, size, framing, total, progress
        self.captions: list[str] = []
        self.done = 0

    def image(self, rel: str, img: Image.Image, pose: Image.Image) -> None:
        """Write an image at `rel` and its pose map at `pose/rel`; count it."""
        _write(self.root / rel, _jpeg_bytes(img))
        _write(self.root / "pose" / rel, _jpeg_bytes(pose))
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)


def _action_pair(rng: np.random.Generator) -> tuple[str, str]:
    """A (normal, anomalous) action for one identity."""
    return (
        NORMAL_ACTIONS[int(rng.integers(len(NORMAL_ACTIONS)))],
        ANOMALOUS_ACTIONS[int(rng.integers(len(ANOMALOUS_ACTIONS)))],
    )


def _train_split(
    sink: _Sink, people: list[Person], rng: np.random.Generator, n_files: int, captions_per_image: int
) -> tuple[list[Path], int]:
    """imgs_K/goal (normal) and imgs_K/full (anomalous) images, one attr_K.json per K; returns the files and pairs."""
    files: list[list[dict[str, str]]] = [[] for _ in range(n_files)]
    counters = [0] * n_files
    for i, person in enumerate(people):
        k = i % n_files
        actions = _action_pair(rng)
        n = counters[k]
        counters[k] += 2
        rels = (f"imgs_{k}/goal/{n}.jpg", f"imgs_{k}/full/{n + 1}.jpg")
        ids = (f"{k}_{n}", f"{k}_{n + 1}")
        captions: list[list[str]] = []
        for rel, action in zip(rels, actions, strict=True):
            img, pose, _ = render_sample(person, action, sink.size, rng, sink.framing)
            sink.image(f"train/{rel}", img, pose)
            captions.append([describe(person, action, rng) for _ in range(captions_per_image)])
        for side in (0, 1):
            other = 1 - side
            for c in range(captions_per_image):
                record = {
                    "image": f"train/{rels[side]}",
                    "caption": captions[side][c],
                    "image_id": ids[side],
                    "hard_i": rels[other],
                    "hard_c": captions[other][c % len(captions[other])],
                    "hard_i_id": ids[other],
                    "source_id": f"{i}_{side}",
                    "source_caption": _source_caption(person, actions[side]),
                    ("normal" if side == 0 else "anomaly"): ACTION_LABELS[actions[side]],
                    "scene": person.scene,
                }
                files[k].append(record)
                sink.captions.append(record["caption"])
    paths = []
    for k, records in enumerate(files):
        path = sink.root / "annotation" / "train" / f"attr_{k}.json"
        _write(path, json.dumps(records, indent=1))
        paths.append(path)
    return paths, sum(len(r) for r in files)


def _eval_split(
    sink: _Sink, split: str, people: list[Person], rng: np.random.Generator, captions_per_image: int
) -> tuple[Path, list[dict], list[Image.Image], list[Image.Image]]:
    """{split}/N.jpg images and annotation/{split}/attr.json; returns the file, records, images and pose maps."""
    records: list[dict] = []
    images: list[Image.Image] = []
    poses: list[Image.Image] = []
    for i, person in enumerate(people):
        actions = _action_pair(rng)
        # Shuffle which of the pair comes first so image order says nothing about behaviour.
        order = (0, 1) if rng.random() < 0.5 else (1, 0)
        for side in order:
            n = len(records)
            img, pose, _ = render_sample(person, actions[side], sink.size, rng, sink.framing)
            images.append(img)
            poses.append(pose)
            caps = [describe(person, actions[side], rng) for _ in range(captions_per_image)]
            sink.captions.extend(caps)
            records.append(
                {
                    "image": f"{split}/{n}.jpg",
                    "image_id": str(n),
                    "caption": caps,
                    ("normal" if side == 0 else "anomaly"): ACTION_LABELS[actions[side]],
                    "scene": person.scene,
                    "person_id": f"{split}_{i}",
                }
            )
            sink.image(f"{split}/{n}.jpg", img, pose)
    path = sink.root / "annotation" / split / "attr.json"
    _write(path, json.dumps(records, indent=1))
    return path, records, images, poses


def _masked_set(
    sink: _Sink,
    test: tuple[list[dict], list[Image.Image], list[Image.Image]],
    test_people: list[Person],
    distractors: list[Person],
    rng: np.random.Generator,
) -> tuple[Path, Path, Path]:
    """The test images under 15-character ids with one fresh caption each, plus distractors; returns query.json,
    query_index.txt and ground_truth.json."""
    masked = sink.root / "name-masked_test-set"
    used_ids: set[str] = set()
    queries: list[dict[str, str]] = []
    truth: list[dict] = []
    for rec, img, pose in zip(*test, strict=True):
        gid = _masked_id(rng, used_ids)
        qid = _masked_id(rng, used_ids)
        _write(masked / "gallery" / f"{gid}.jpg", _jpeg_bytes(img))
        _write(sink.root / "pose" / masked.name / "gallery" / f"{gid}.jpg", _jpeg_bytes(pose))
        person = test_people[int(rec["person_id"].split("_")[1])]
        action = next(a for a, label in ACTION_LABELS.items() if label == rec.get("normal", rec.get("anomaly")))
        caption = describe(person, action, rng)
        sink.captions.append(caption)
        queries.append({"query_index": qid, "caption": caption})
        kept = {k: v for k, v in rec.items() if k not in ("image", "image_id", "caption")}
        truth.append({**kept, "image": f"gallery/{gid}.jpg", "image_id": qid, "query_index": qid, "caption": [caption]})
    for person in distractors:
        action = (NORMAL_ACTIONS + ANOMALOUS_ACTIONS)[int(rng.integers(8))]
        img, pose, _ = render_sample(person, action, sink.size, rng, sink.framing)
        sink.image(f"name-masked_test-set/gallery/{_masked_id(rng, used_ids)}.jpg", img, pose)
    # Real query files are not in gallery order; shuffle so nothing can lean on that.
    perm = rng.permutation(len(queries))
    queries = [queries[int(j)] for j in perm]
    query_json, query_index, ground_truth = (
        masked / "query.json",
        masked / "query_index.txt",
        masked / "ground_truth.json",
    )
    _write(query_json, "".join(json.dumps(q) + "\n" for q in queries))
    _write(query_index, "".join(q["query_index"] + "\n" for q in queries))
    _write(ground_truth, json.dumps([truth[int(j)] for j in perm], indent=1))
    return query_json, query_index, ground_truth


def _prepare_root(root: Path, overwrite: bool) -> None:
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise TpasInputError("output folder is not empty (pass overwrite=True / --overwrite)", root)
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)


def generate_mini_pab(
    root: str | Path,
    *,
    seed: int = 0,
    n_identities: int = 100,
    n_val_identities: int = 20,
    n_test_identities: int = 30,
    n_distractors: int = 40,
    image_size: tuple[int, int] = (64, 128),
    train_captions_per_image: int = 2,
    test_captions_per_image: int = 2,
    n_train_files: int = 2,
    vocab_size: int = 2000,
    framing: str = "scene",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> MiniPab:
    """Write a seeded synthetic mini-PAB under `root` (layout in the module docstring) and return its paths.

    Args:
        root: output folder; must be empty or absent unless `overwrite`.
        seed: everything (appearance, poses, captions, ids) follows from it; same seed -> byte-identical files.
        n_identities: training identities; each gives a normal and an anomalous image (the IHNM pair).
        n_val_identities / n_test_identities: identities of the validation / test splits (2 images each).
        n_distractors: extra gallery images of unseen identities in the name-masked set.
        image_size: (width, height) of every image and pose map.
        train_captions_per_image: training records per image (records sharing an image share its `image_id`).
        test_captions_per_image: captions per image in the validation/test `attr.json`.
        n_train_files: how many `attr_K.json` files (and `imgs_K` folders) the training pairs are spread over.
        vocab_size: upper bound of the WordPiece vocabulary size.
        framing: "scene" (the person about half the image height over their scene) or "person" (the figure fills
            the frame, as a pedestrian detector's crop; appearance dominates the pixels).
        overwrite: replace an existing non-empty `root`.
        progress: called as progress(done, total) after each image.
    """
    root = Path(root)
    if n_identities < 1 or n_test_identities < 1 or n_val_identities < 1 or n_train_files < 1:
        raise TpasInputError("identity and file counts must be >= 1")
    if min(image_size) < 16:
        raise TpasInputError(f"image_size {image_size} is too small; use at least 16x16")
    if train_captions_per_image < 1 or test_captions_per_image < 1:
        raise TpasInputError("captions per image must be >= 1")
    if framing not in FRAMINGS:
        raise TpasInputError(f"unknown framing {framing!r}; choose one of {', '.join(FRAMINGS)}")
    _prepare_root(root, overwrite)
    size = (int(image_size[0]), int(image_size[1]))

    # Separate streams per purpose, so e.g. asking for more distractors does not change the training set.
    seeds = np.random.SeedSequence(seed).spawn(5)
    id_rng, train_rng, val_rng, test_rng, masked_rng = (np.random.default_rng(s) for s in seeds)
    used: set[Person] = set()
    train_people = [_random_person(id_rng, used) for _ in range(n_identities)]
    val_people = [_random_person(id_rng, used) for _ in range(n_val_identities)]
    test_people = [_random_person(id_rng, used) for _ in range(n_test_identities)]
    distractor_people = [_random_person(id_rng, used) for _ in range(n_distractors)]
    sink = _Sink(
        root, size, framing, 2 * (n_identities + n_val_identities + n_test_identities) + n_distractors, progress
    )

    train_paths, n_pairs = _train_split(sink, train_people, train_rng, n_train_files, train_captions_per_image)
    val_path, *_ = _eval_split(sink, "val", val_people, val_rng, test_captions_per_image)
    test_path, *test = _eval_split(sink, "test", test_people, test_rng, test_captions_per_image)
    query_json, query_index, ground_truth = _masked_set(sink, tuple(test), test_people, distractor_people, masked_rng)
    vocab = train_wordpiece_vocab(sink.captions, root / "vocab.txt", vocab_size=vocab_size)
    return MiniPab(
        root=root,
        train_annotations=train_paths,
        val_annotation=val_path,
        test_annotation=test_path,
        pose_dir=root / "pose",
        gallery_dir=root / "name-masked_test-set" / "gallery",
        query_json=query_json,
        query_index=query_index,
        ground_truth=ground_truth,
        vocab=vocab,
        n_train_pairs=n_pairs,
        n_val_images=2 * n_val_identities,
        n_test_images=2 * n_test_identities,
        n_gallery=len(test[0]) + n_distractors,
        meta={"seed": seed, "image_size": list(size), "framing": framing},
    )
