"""Rendered surveillance clips: people with identities doing behaviours, with exact labels and answers.

Library module for the privacy (edge-cloud camera) work: `make_identities` builds a set of identities
(face glyph, colours, clothing pattern, height), `make_splits` renders seeded, deterministic train/test
clips (2-4 small RGB frames drawn with PIL) with behaviour labels, identity labels and questions with
exact answers, and `check_splits` verifies that test identities appear in training while no test clip
(or frame) does. Nothing is downloaded. Design: docs/choices.md#privacy.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

#: Frame sides must be multiples of the tiny Qwen3-VL patch grid: patch 8 x spatial merge 2.
FRAME_MULTIPLE = 16
#: Clip-level behaviour labels (index = class id). `fight` involves two people.
BEHAVIOURS = ("walk_left", "walk_right", "fall", "sit", "wave", "loiter", "fight")
#: Behaviours an extra (bystander) person may do: none of them changes the clip's event label.
BYSTANDER_BEHAVIOURS = ("walk_left", "walk_right", "loiter")

_SKIN = ((241, 194, 125), (224, 172, 105), (141, 85, 36), (198, 134, 66), (255, 219, 172))
_HAIR = ((20, 20, 20), (110, 60, 20), (230, 200, 80), (200, 60, 30), (160, 160, 160))
_SHIRT = (
    (220, 30, 30),
    (30, 90, 220),
    (30, 170, 60),
    (240, 200, 0),
    (150, 40, 180),
    (255, 130, 0),
    (0, 190, 190),
    (245, 245, 245),
)
_TROUSERS = ((30, 30, 90), (60, 60, 60), (120, 80, 40), (10, 10, 10), (100, 130, 160))
PATTERNS = ("solid", "stripes", "dots", "checks")
GLYPHS = ("dots", "visor", "glasses", "beard")
_HEIGHTS = (0.42, 0.5, 0.58)  # person height as a fraction of the frame height
#: The standard questions every clip carries (answers: `questions_for`).
QUESTIONS = (
    "Did anyone fall?",
    "Is anyone fighting?",
    "Is anyone sitting down?",
    "How many people are walking left?",
    "How many people are walking right?",
    "How many people are in the scene?",
)


@dataclass(frozen=True)
class Identity:
    """What makes a person recognisable: colours, clothing pattern, face glyph and height."""

    index: int
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    shirt: tuple[int, int, int]
    trousers: tuple[int, int, int]
    pattern: str
    glyph: str
    height: float

    def attributes(self) -> tuple:
        return (self.skin, self.hair, self.shirt, self.trousers, self.pattern, self.glyph, self.height)


@dataclass(frozen=True)
class Person:
    """One person in a clip: identity index, behaviour, and the track parameters of the rendering."""

    identity: int
    behaviour: str
    x: float  # feet position at frame 0, fraction of the frame width
    speed: float  # fraction of the frame width per frame (walks)
    facing: int  # +1 right, -1 left
    jitter: tuple[tuple[int, int], ...] = ()  # per-frame pixel offsets (loiter, fight)


@dataclass(frozen=True)
class Clip:
    """A rendered clip with its labels: `behaviour`/`identity` are the primary person's."""

    clip_id: str
    frames: np.ndarray  # [T, H, W, 3] uint8
    behaviour: str
    identity: int
    people: tuple[Person, ...]
    questions: tuple[tuple[str, str], ...]
    background: tuple[int, int, int]
    floor: tuple[int, int, int]

    def frame_hashes(self) -> list[str]:
        return [hashlib.sha1(f.tobytes()).hexdigest() for f in self.frames]

    def content_hash(self) -> str:
        return hashlib.sha1(self.frames.tobytes()).hexdigest()


@dataclass
class CamSplit:
    """One split: the clips plus stacked arrays (frames [N,T,H,W,3] uint8, label ids [N])."""

    name: str
    clips: list[Clip]
    frames: np.ndarray = field(init=False)
    behaviour: np.ndarray = field(init=False)
    identity: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.frames = np.stack([c.frames for c in self.clips])
        self.behaviour = np.array([BEHAVIOURS.index(c.behaviour) for c in self.clips], dtype=np.int64)
        self.identity = np.array([c.identity for c in self.clips], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.clips)


@dataclass
class CamData:
    identities: list[Identity]
    train: CamSplit
    test: CamSplit


def make_identities(n: int = 24, seed: int = 0) -> list[Identity]:
    """`n` identities, seeded; any two differ in at least two attributes (so none is a near-copy)."""
    if n < 2:
        raise ValueError(f"n_identities must be >= 2, got {n}")
    rng = random.Random(f"camgen-identities:{seed}")
    combos = list(
        itertools.product(
            range(len(_SKIN)),
            range(len(_HAIR)),
            range(len(_SHIRT)),
            range(len(_TROUSERS)),
            range(len(PATTERNS)),
            range(len(GLYPHS)),
            range(len(_HEIGHTS)),
        )
    )
    rng.shuffle(combos)
    chosen: list[tuple[int, ...]] = []
    for combo in combos:
        if all(sum(a != b for a, b in zip(combo, other, strict=True)) >= 2 for other in chosen):
            chosen.append(combo)
            if len(chosen) == n:
                break
    if len(chosen) < n:
        raise ValueError(f"cannot make {n} distinct identities")
    return [
        Identity(i, _SKIN[s], _HAIR[h], _SHIRT[c], _TROUSERS[t], PATTERNS[p], GLYPHS[g], _HEIGHTS[k])
        for i, (s, h, c, t, p, g, k) in enumerate(chosen)
    ]


def questions_for(people: tuple[Person, ...]) -> tuple[tuple[str, str], ...]:
    """The standard questions about a clip and their exact answers ("yes"/"no" or a count)."""
    counts = Counter(p.behaviour for p in people)

    def yes(b: str) -> str:
        return "yes" if counts[b] else "no"

    answers = (
        yes("fall"),
        yes("fight"),
        yes("sit"),
        str(counts["walk_left"]),
        str(counts["walk_right"]),
        str(len(people)),
    )
    return tuple(zip(QUESTIONS, answers, strict=True))


def answers_for(behaviour: str) -> tuple[tuple[str, str], ...]:
    """The standard questions' answers for a clip whose only event is `behaviour` (a fight has two
    people, every other behaviour one): how the cloud answers from its behaviour prediction."""
    n = 2 if behaviour == "fight" else 1
    return questions_for(tuple(Person(i, behaviour, 0.5, 0.0, 1) for i in range(n)))


# ---------------------------------------------------------------------------------------------- drawing
def _shade(rgb: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, int(c * f))) for c in rgb)  # type: ignore[return-value]


def _skeleton(sit: float, arm: tuple[float, float], legs: float) -> dict[str, tuple[float, float]]:
    """Keypoints in body units (x forward, y up, feet at 0, height 1). `sit` in [0,1] lowers the hips
    and folds the legs forward; `arm` = (front, back) arm angles in degrees from hanging down; `legs`
    spreads the feet (walking phase). Rotation (falls) is applied by the caller."""
    hip_y = 0.47 - 0.22 * sit
    knee = (0.2 * sit + 0.05 * legs, hip_y - 0.22 * (1 - sit) - 0.02 * sit)
    pts = {
        "hip": (0.0, hip_y),
        "neck": (0.0, hip_y + 0.33),
        "head": (0.0, hip_y + 0.43),
        "knee": knee,
        "foot_f": (0.22 * sit + 0.12 * legs, 0.0),
        "foot_b": (0.22 * sit - 0.12 * legs, 0.0),
    }
    for name, angle in zip(("hand_f", "hand_b"), arm, strict=True):
        a = math.radians(angle)
        pts[name] = (0.3 * math.sin(a), hip_y + 0.3 - 0.3 * math.cos(a))
    return pts


def _draw_person(
    draw: ImageDraw.ImageDraw,
    ident: Identity,
    cx: float,
    fy: float,
    h: float,
    facing: int,
    tilt: float,
    sit: float,
    arm: tuple[float, float],
    legs: float,
) -> None:
    """Draws one person whose feet are at pixel (cx, fy), `h` pixels tall, rotated by `tilt` degrees
    about the feet (90 = lying on the floor, falling the way it faces)."""
    pts = _skeleton(sit, arm, legs)
    t = math.radians(tilt)
    cos_t, sin_t = math.cos(t), math.sin(t)

    def px(p: tuple[float, float]) -> tuple[float, float]:
        x, y = p[0] * cos_t + p[1] * sin_t, -p[0] * sin_t + p[1] * cos_t  # rotate forward
        return cx + facing * x * h, fy - y * h

    width = max(1, round(0.07 * h))
    for a, b, col in (
        ("hip", "foot_b", ident.trousers),
        ("hip", "knee", ident.trousers),
        ("knee", "foot_f", ident.trousers),
    ):
        draw.line(
            [px(pts[a]), px(pts[b])],
            fill=_shade(col, 0.85 if a == "hip" and b == "foot_b" else 1.0),
            width=width,
        )
    # torso: a quadrilateral around hip -> neck, with the clothing pattern in body coordinates
    half = 0.11
    hip_y, neck_y = pts["hip"][1], pts["neck"][1]
    corners = [(-half, hip_y), (half, hip_y), (half, neck_y), (-half, neck_y)]
    draw.polygon([px(c) for c in corners], fill=ident.shirt)
    dark = _shade(ident.shirt, 0.45) if sum(ident.shirt) > 200 else (230, 230, 230)
    if ident.pattern in ("stripes", "checks"):
        for k in range(1, 4):
            y = hip_y + (neck_y - hip_y) * k / 4
            draw.line([px((-half, y)), px((half, y))], fill=dark, width=1)
    if ident.pattern == "checks":
        draw.line([px((0.0, hip_y)), px((0.0, neck_y))], fill=dark, width=1)
    if ident.pattern == "dots":
        for dx, fy_ in ((-0.05, 0.3), (0.05, 0.55), (-0.05, 0.8)):
            x, y = px((dx, hip_y + (neck_y - hip_y) * fy_))
            draw.rectangle([x, y, x + 0.8, y + 0.8], fill=dark)
    for hand in ("hand_b", "hand_f"):
        draw.line([px(pts["neck"]), px(pts[hand])], fill=ident.skin, width=max(1, width - 1))
    # head, hair, face glyph
    hx, hy = px(pts["head"])
    r = max(2.0, 0.1 * h)
    draw.ellipse([hx - r, hy - r, hx + r, hy + r], fill=ident.skin)
    top = px((0.0, pts["head"][1] + 0.07))
    draw.ellipse([top[0] - r, top[1] - r * 0.7, top[0] + r, top[1] + r * 0.5], fill=ident.hair)
    ex = hx + facing * r * 0.35
    eye = (0, 0, 0)
    if ident.glyph == "dots":
        draw.point([(ex - 1, hy - 1), (ex + 1, hy - 1)], fill=eye)
    elif ident.glyph == "visor":
        draw.line([(hx - r, hy - 1), (hx + r, hy - 1)], fill=(0, 200, 255), width=1)
    elif ident.glyph == "glasses":
        draw.rectangle([ex - 2, hy - 2, ex + 1, hy], outline=(255, 255, 255))
    else:  # beard
        draw.chord([hx - r, hy - r * 0.2, hx + r, hy + r], 0, 180, fill=_shade(ident.hair, 0.8))


def _frame_pose(person: Person, t: int, n_frames: int) -> dict:
    """Pose of `person` at frame t: position offset, tilt, sit amount, arm angles, leg spread."""
    p = t / (n_frames - 1)
    pose = {"dx": 0.0, "dy": 0.0, "tilt": 0.0, "sit": 0.0, "arm": (10.0, -10.0), "legs": 0.0}
    b = person.behaviour
    if b in ("walk_left", "walk_right"):
        pose["dx"] = person.speed * t * (1 if b == "walk_right" else -1)
        pose["legs"] = 1.0 if t % 2 == 0 else -1.0
        pose["arm"] = (30.0, -30.0) if t % 2 == 0 else (-30.0, 30.0)
    elif b == "fall":
        pose["tilt"] = 90.0 * p
        pose["arm"] = (60.0 * p + 10, -10.0)
    elif b == "sit":
        pose["sit"] = p
        pose["arm"] = (10.0 + 40 * p, -10.0)
    elif b == "wave":
        pose["arm"] = (150.0 if t % 2 == 0 else 110.0, -10.0)
    elif b == "fight":
        pose["arm"] = (90.0, 60.0) if t % 2 == 0 else (60.0, 90.0)
    if person.jitter:
        pose["jx"], pose["jy"] = person.jitter[t]
    return pose


def render_background(
    size: int, background: tuple[int, int, int], floor: tuple[int, int, int]
) -> Image.Image:
    """The empty scene: a wall colour and a floor band below `floor_y(size)`."""
    img = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(img).rectangle([0, floor_y(size), size, size], fill=floor)
    return img


def floor_y(size: int) -> int:
    return int(size * 0.86)


def render_clip(
    people: tuple[Person, ...],
    identities: list[Identity],
    n_frames: int,
    size: int,
    background: tuple[int, int, int],
    floor: tuple[int, int, int],
) -> np.ndarray:
    """Frames [T, H, W, 3] uint8 of `people` over the scene."""
    base = render_background(size, background, floor)
    fy = floor_y(size) + 1
    frames = []
    for t in range(n_frames):
        img = base.copy()
        draw = ImageDraw.Draw(img)
        for person in people:
            ident = identities[person.identity]
            pose = _frame_pose(person, t, n_frames)
            cx = (person.x + pose["dx"]) * size + pose.get("jx", 0)
            _draw_person(
                draw,
                ident,
                cx,
                fy + pose.get("jy", 0),
                ident.height * size,
                person.facing,
                pose["tilt"],
                pose["sit"],
                pose["arm"],
                pose["legs"],
            )
        frames.append(np.asarray(img, dtype=np.uint8))
    return np.stack(frames)


# ------------------------------------------------------------------------------------------- generation
def _people_for(
    behaviour: str, identity: int, height: float, n_identities: int, extra: int, rng: random.Random
) -> tuple[Person, ...]:
    def jitter(n: int, amp: int) -> tuple[tuple[int, int], ...]:
        return tuple((rng.randint(-amp, amp), rng.randint(-amp // 2, 0)) for _ in range(n))

    n_frames = 4  # jitter tuples are sized for the longest clip; shorter clips read a prefix
    facing = rng.choice((-1, 1))
    if behaviour == "walk_left":
        people = [Person(identity, behaviour, rng.uniform(0.6, 0.85), rng.uniform(0.07, 0.11), -1)]
    elif behaviour == "walk_right":
        people = [Person(identity, behaviour, rng.uniform(0.15, 0.4), rng.uniform(0.07, 0.11), 1)]
    elif behaviour == "fall":  # the lying body (as long as the person is tall) stays inside the frame
        direction = rng.choice((-1, 1))
        lo, hi = (0.05, 0.95 - height) if direction > 0 else (0.05 + height, 0.95)
        people = [Person(identity, behaviour, rng.uniform(lo, hi), 0.0, direction)]
    elif behaviour == "fight":
        x = rng.uniform(0.3, 0.45)
        other = rng.choice([i for i in range(n_identities) if i != identity])
        gap = rng.uniform(0.16, 0.22)
        people = [
            Person(identity, behaviour, x, 0.0, 1, jitter(n_frames, 2)),
            Person(other, behaviour, x + gap, 0.0, -1, jitter(n_frames, 2)),
        ]
    elif behaviour == "loiter":
        people = [Person(identity, behaviour, rng.uniform(0.2, 0.8), 0.0, facing, jitter(n_frames, 2))]
    else:  # sit, wave
        people = [Person(identity, behaviour, rng.uniform(0.2, 0.8), 0.0, facing)]
    for _ in range(extra):
        b = rng.choice(BYSTANDER_BEHAVIOURS)
        who = rng.randrange(n_identities)
        if b == "walk_left":
            people.append(Person(who, b, rng.uniform(0.6, 0.95), rng.uniform(0.07, 0.11), -1))
        elif b == "walk_right":
            people.append(Person(who, b, rng.uniform(0.05, 0.4), rng.uniform(0.07, 0.11), 1))
        else:
            people.append(
                Person(who, b, rng.uniform(0.05, 0.95), 0.0, rng.choice((-1, 1)), jitter(n_frames, 2))
            )
    return tuple(people)


def generate_split(
    name: str,
    n_clips: int,
    identities: list[Identity],
    *,
    n_frames: int = 3,
    size: int = 64,
    seed: int = 0,
    max_extra_people: int = 0,
    exclude: set[str] | None = None,
) -> CamSplit:
    """`n_clips` clips, balanced over identities and behaviours (each shuffled independently), seeded.

    A clip whose content or any frame hash is in `exclude` is redrawn (so a test split never repeats
    a training clip or frame)."""
    _check_shape(n_frames, size)
    if n_clips < 1:
        raise ValueError(f"n_clips must be >= 1, got {n_clips}")
    k = len(identities)
    rng = random.Random(f"camgen:{seed}:{name}")
    who = [i % k for i in range(n_clips)]
    what = [BEHAVIOURS[i % len(BEHAVIOURS)] for i in range(n_clips)]
    rng.shuffle(who)
    rng.shuffle(what)
    exclude = exclude or set()
    clips = []
    for i in range(n_clips):
        for attempt in itertools.count():
            crng = random.Random(f"camgen:{seed}:{name}:{i}:{attempt}")
            extra = crng.randint(0, max_extra_people) if max_extra_people else 0
            people = _people_for(what[i], who[i], identities[who[i]].height, k, extra, crng)
            bg = (crng.randint(90, 200), crng.randint(90, 200), crng.randint(90, 200))
            floor = _shade(bg, crng.uniform(0.55, 0.75))
            frames = render_clip(people, identities, n_frames, size, bg, floor)
            clip = Clip(f"{name}-{i:06d}", frames, what[i], who[i], people, questions_for(people), bg, floor)
            if clip.content_hash() not in exclude and not exclude.intersection(clip.frame_hashes()):
                break
            if attempt > 20:
                raise RuntimeError(f"{name} clip {i}: could not draw a clip outside the excluded set")
        clips.append(clip)
    return CamSplit(name, clips)


def _check_shape(n_frames: int, size: int) -> None:
    if not 2 <= n_frames <= 4:
        raise ValueError(f"n_frames must be 2..4, got {n_frames}")
    if size < FRAME_MULTIPLE or size % FRAME_MULTIPLE:
        raise ValueError(
            f"frame size must be a positive multiple of {FRAME_MULTIPLE} (patch 8 x merge 2), got {size}"
        )


def make_splits(
    n_train: int = 840,
    n_test: int = 336,
    *,
    n_identities: int = 24,
    n_frames: int = 3,
    size: int = 64,
    seed: int = 0,
    max_extra_people: int = 0,
) -> CamData:
    """Train and test splits over the same identities; no test clip or frame occurs in training."""
    identities = make_identities(n_identities, seed)
    kw = dict(n_frames=n_frames, size=size, seed=seed, max_extra_people=max_extra_people)
    train = generate_split("train", n_train, identities, **kw)
    seen = {c.content_hash() for c in train.clips} | {h for c in train.clips for h in c.frame_hashes()}
    test = generate_split("test", n_test, identities, exclude=seen, **kw)
    data = CamData(identities, train, test)
    check_splits(data)
    return data


def check_splits(data: CamData) -> None:
    """Raises ValueError unless every test identity occurs in training and no test clip, clip id or
    frame equals a training one (re-identification is the threat, memorised clips are not)."""
    train_ids = set(data.train.identity.tolist())
    missing = sorted(set(data.test.identity.tolist()) - train_ids)
    if missing:
        raise ValueError(f"test identities {missing} never appear in the training split")
    train_clip_ids = {c.clip_id for c in data.train.clips}
    train_hashes = {c.content_hash(): c.clip_id for c in data.train.clips}
    train_frames = {h: c.clip_id for c in data.train.clips for h in c.frame_hashes()}
    for clip in data.test.clips:
        if clip.clip_id in train_clip_ids:
            raise ValueError(f"test clip id {clip.clip_id} also names a training clip")
        if clip.content_hash() in train_hashes:
            raise ValueError(
                f"test clip {clip.clip_id} equals training clip {train_hashes[clip.content_hash()]}"
            )
        for t, h in enumerate(clip.frame_hashes()):
            if h in train_frames:
                raise ValueError(
                    f"frame {t} of test clip {clip.clip_id} equals a frame of training clip {train_frames[h]}"
                )
