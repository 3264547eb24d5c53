"""A synthetic video-language world, generated offline from a seed: short videos of shapes that move, appear,
change colour or leave the frame, with captions and questions whose answers are right by construction.

It is what the vision half of LWM is trained and evaluated on when no pretrained VQGAN or video corpus is at
hand (issue: the multimodal half, trained end to end offline). A scene is a small list of objects, each with a
shape, colour and size, a start position, a velocity and at most one event:

    shapes     circle, square, triangle (apex up)
    colours    red, green, blue, yellow, white (PALETTE: sRGB)
    sizes      small (half-size 0.14 of the frame side), large (0.24)
    motion     still, or left / right / up / down by a constant step per frame
    events     appears (absent before its frame), changes colour (from its frame on), leaves the frame (it
               moves out past an edge by the last frame)

The objects of one scene have distinct shapes and distinct colours, so "the red circle" and "the circle" each
name one object. Images are one-frame scenes (no motion, no events). Held-out combinations: the (shape,
colour) pairs of `WorldConfig.held_out` never occur in the `train` split; every `test` scene has at least one
object that shows one of them (at its first appearance), so test questions ask about unseen combinations.

Questions, with the answer set each draws from (chance = 1 / its size):

    shape        "What shape is the <colour> object?"                      SHAPES
    colour       "What colour is the <shape>?" (its colour when first seen) COLOURS
    final_colour "What colour is the <shape> at the end?" (videos with a colour change) COLOURS
    direction    "Which way does the <colour> <shape> move?"              DIRECTIONS
    count        "How many objects are there?" (seen in any frame)        COUNTS
    first        "What happened first: <event a> or <event b>?"           the two events (chance 1/2)

Worked example (seed 0 draws something like it): a large red circle moving right and a small blue square
that appears at frame 2 -> caption "A large red circle moves right. A small blue square appears.";
("How many objects are there?", "two"); ("Which way does the red circle move?", "right").

Pixel rules (`read_colour`, `read_shape`, `read_direction`) read a rendered or generated frame back: the
dominant colour is the palette entry nearest to most foreground pixels; the shape is read from the fill
ratio of the foreground mask in its bounding box (square 1.0, circle pi/4 = 0.785, triangle 0.5: thresholds
halfway between); the direction from the foreground centroid's path (first to last frame, the larger axis).
Their own accuracy on ground-truth frames is what an evaluation of generated frames reports beside its score.

Frames are uint8 (T, R, R, 3); `to_model_range` in lwm.utils.vision_io maps them to [-1, 1].
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional, Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle")
PALETTE = {"red": (220, 40, 40), "green": (40, 190, 70), "blue": (50, 90, 235), "yellow": (240, 215, 40),
           "white": (240, 240, 240)}
COLOURS = tuple(PALETTE)
SIZES = {"small": 0.14, "large": 0.24}           # half-size as a fraction of the frame side
DIRECTIONS = ("left", "right", "up", "down")
COUNTS = ("one", "two", "three")
BACKGROUND = (16, 16, 16)
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}   # (x, y), y down
EVENTS = ("appears", "changes_colour", "leaves")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """resolution: frame side in pixels; n_frames: frames per video; max_objects: 1..3 objects per video;
    event_prob: the chance that an object has an event; held_out: (shape, colour) pairs kept out of `train`."""

    resolution: int = 32
    n_frames: int = 4
    max_objects: int = 2
    event_prob: float = 0.5
    held_out: tuple = (("triangle", "blue"), ("circle", "yellow"), ("square", "green"))

    def __post_init__(self):
        if self.resolution < 8:
            raise ValueError(f"WorldConfig.resolution={self.resolution} must be >= 8")
        if self.n_frames < 1:
            raise ValueError(f"WorldConfig.n_frames={self.n_frames} must be >= 1")
        if not 1 <= self.max_objects <= len(SHAPES):
            raise ValueError(f"WorldConfig.max_objects={self.max_objects} must be in [1, {len(SHAPES)}]")
        if not 0 <= self.event_prob <= 1:
            raise ValueError(f"WorldConfig.event_prob={self.event_prob} must be in [0, 1]")
        for pair in self.held_out:
            if tuple(pair)[0] not in SHAPES or tuple(pair)[1] not in COLOURS:
                raise ValueError(f"WorldConfig.held_out: {pair} is not a (shape, colour) pair of {SHAPES} x "
                                 f"{COLOURS}")
        object.__setattr__(self, "held_out", tuple(tuple(p) for p in self.held_out))


@dataclasses.dataclass(frozen=True)
class Obj:
    """One object. x, y: its centre at frame 0 in frame-side units (0..1, y down); direction: '' (still) or
    one of DIRECTIONS, moving `speed` frame sides per frame; event: '' or one of EVENTS, at frame `event_t`
    (appears: absent before; changes_colour: `new_colour` from then on; leaves: moves out past an edge)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    direction: str = ""
    speed: float = 0.0
    event: str = ""
    event_t: int = 0
    new_colour: str = ""

    def centre(self, t: int) -> tuple:
        dx, dy = _STEP.get(self.direction, (0, 0))
        return self.x + dx * self.speed * t, self.y + dy * self.speed * t

    def visible(self, t: int) -> bool:
        if self.event == "appears" and t < self.event_t:
            return False
        cx, cy = self.centre(t)
        h = SIZES[self.size]
        return -h < cx < 1 + h and -h < cy < 1 + h

    def colour_at(self, t: int) -> str:
        return self.new_colour if self.event == "changes_colour" and t >= self.event_t else self.colour

    def first_seen(self, n_frames: int) -> Optional[int]:
        return next((t for t in range(n_frames) if self.visible(t)), None)

    def name(self, with_colour: bool = True) -> str:
        return f"{self.colour} {self.shape}" if with_colour else self.shape


@dataclasses.dataclass(frozen=True)
class Scene:
    """A video (n_frames > 1) or an image (n_frames == 1) of 1..3 objects; `seed` and `split` made it."""

    objects: tuple
    n_frames: int
    seed: int
    split: str

    @property
    def is_image(self) -> bool:
        return self.n_frames == 1


@dataclasses.dataclass(frozen=True)
class QA:
    kind: str                 # shape | colour | final_colour | direction | count | first
    question: str
    answer: str
    choices: tuple            # the answer set (chance = 1 / len(choices))


# ------------------------------------------------------------------------------------------- sampling

def _sample_object(rng: np.random.Generator, shape: str, colour: str, n_frames: int, event_prob: float,
                   free_colours: Sequence[str]) -> Obj:
    size = str(rng.choice(list(SIZES)))
    h = SIZES[size]
    if n_frames == 1:
        return Obj(shape, colour, size, float(rng.uniform(h, 1 - h)), float(rng.uniform(h, 1 - h)))
    event = str(rng.choice(EVENTS)) if rng.random() < event_prob else ""
    if event == "changes_colour" and not free_colours:
        event = ""
    direction = str(rng.choice(DIRECTIONS)) if event == "leaves" or rng.random() < 0.75 else ""
    dx, dy = _STEP.get(direction, (0, 0))
    span = n_frames - 1
    if event == "leaves":
        # start inside, end past the edge it moves towards: speed so the last frame is out
        speed = float(rng.uniform(0.55, 0.75)) / span
        x0 = float(rng.uniform(h, 1 - h)) if dx == 0 else (0.55 + 0.1 * rng.random() if dx > 0 else
                                                            0.45 - 0.1 * rng.random())
        y0 = float(rng.uniform(h, 1 - h)) if dy == 0 else (0.55 + 0.1 * rng.random() if dy > 0 else
                                                            0.45 - 0.1 * rng.random())
        # leave by the last frame: the centre must pass 1 + h (or -h)
        need = max((1 + h - x0) if dx > 0 else (x0 + h) if dx < 0 else 0,
                   (1 + h - y0) if dy > 0 else (y0 + h) if dy < 0 else 0)
        speed = max(speed, need / span + 1e-3)
        return Obj(shape, colour, size, x0, y0, direction, speed, "leaves", span)
    speed = 0.0
    if direction:
        speed = float(rng.uniform(0.25, 0.45)) / span      # moves 0.25..0.45 of the frame in all
    travel = speed * span
    lo_x, hi_x = h + (travel if dx < 0 else 0), 1 - h - (travel if dx > 0 else 0)
    lo_y, hi_y = h + (travel if dy < 0 else 0), 1 - h - (travel if dy > 0 else 0)
    x0, y0 = float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))
    event_t = int(rng.integers(1, n_frames)) if event else 0
    new_colour = str(rng.choice(list(free_colours))) if event == "changes_colour" else ""
    return Obj(shape, colour, size, x0, y0, direction, speed, event, event_t, new_colour)


def _combos(obj: Obj, n_frames: int) -> set:
    """The (shape, colour) pairs an object shows in the video."""
    return {(obj.shape, obj.colour_at(t)) for t in range(n_frames) if obj.visible(t)}


def sample_scene(seed: int, config: WorldConfig = WorldConfig(), split: str = "train",
                 image: bool = False) -> Scene:
    """The scene of `seed` in `split` ('train' or 'test'; module docstring): deterministic in (seed, config,
    split, image). Raises ValueError for another split."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}; choose 'train' or 'test'")
    n_frames = 1 if image else config.n_frames
    held = set(config.held_out)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, int(image)])
    for _ in range(1000):
        n = int(rng.integers(1, config.max_objects + 1))
        shapes = [str(s) for s in rng.permutation(SHAPES)[:n]]
        colours = [str(c) for c in rng.permutation(COLOURS)[:n]]
        if split == "test" and not held:
            raise ValueError("split='test' needs WorldConfig.held_out")
        if split == "test":                     # the first object shows a held-out pair when first seen
            shape, colour = sorted(held)[int(rng.integers(len(held)))]
            shapes = [shape] + [s for s in shapes if s != shape][:n - 1]
            colours = [colour] + [c for c in colours if c != colour][:n - 1]
        objects = []
        for i, (shape, colour) in enumerate(zip(shapes, colours)):
            free = [c for c in COLOURS if c not in colours and c not in {o.new_colour for o in objects}]
            objects.append(_sample_object(rng, shape, colour, n_frames, config.event_prob, free))
        objs = tuple(objects)
        if any(o.first_seen(n_frames) is None for o in objs):
            continue
        shown = set().union(*(_combos(o, n_frames) for o in objs))
        if split == "train" and shown & held:
            continue
        if split == "test" and not shown & held:
            continue
        return Scene(objs, n_frames, int(seed), split)
    raise RuntimeError(f"no scene for seed={seed} split={split} in 1000 draws (WorldConfig {config})")


# ------------------------------------------------------------------------------------------ rendering

def _mask(shape: str, cx: float, cy: float, h: float, r: int) -> np.ndarray:
    """(r, r) bool: the pixel centres inside the shape (centre cx, cy and half-size h in frame units)."""
    c = (np.arange(r) + 0.5) / r
    x, y = c[None, :], c[:, None]
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= h * h
    if shape == "square":
        return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    # triangle, apex up: rows from cy - h (apex) to cy + h (base), half-width growing from 0 to h
    rel = (y - (cy - h)) / (2 * h)
    return (rel >= 0) & (rel <= 1) & (np.abs(x - cx) <= h * rel)


def render(scene: Scene, resolution: int = 32) -> np.ndarray:
    """(T, R, R, 3) uint8 frames of `scene`, objects drawn in order over BACKGROUND."""
    frames = np.empty((scene.n_frames, resolution, resolution, 3), np.uint8)
    frames[:] = BACKGROUND
    for t in range(scene.n_frames):
        for obj in scene.objects:
            if obj.visible(t):
                cx, cy = obj.centre(t)
                frames[t][_mask(obj.shape, cx, cy, SIZES[obj.size], resolution)] = PALETTE[obj.colour_at(t)]
    return frames


# ------------------------------------------------------------------------------------- language side

def _event_phrase(obj: Obj) -> str:
    if obj.event == "appears":
        return f"the {obj.name()} appeared"
    if obj.event == "changes_colour":
        return f"the {obj.name()} turned {obj.new_colour}"
    if obj.event == "leaves":
        return f"the {obj.name()} left the frame"
    return ""


def caption(scene: Scene) -> str:
    """One sentence per object: "A <size> <colour> <shape> <motion>[, <event>]." (images: "is shown")."""
    parts = []
    for obj in scene.objects:
        what = f"a {obj.size} {obj.colour} {obj.shape}"
        if scene.is_image:
            parts.append(f"{what} is shown")
            continue
        verbs = []
        if obj.event == "appears":
            verbs.append("appears")
        if obj.direction and obj.event != "leaves":
            verbs.append(f"moves {obj.direction}")
        if obj.event == "leaves":
            verbs.append(f"leaves the frame moving {obj.direction}")
        if obj.event == "changes_colour":
            verbs.append(f"turns {obj.new_colour}")
        parts.append(f"{what} {' and '.join(verbs) if verbs else 'stays still'}")
    return " ".join(p[0].upper() + p[1:] + "." for p in parts)


def questions(scene: Scene) -> list:
    """Every question the scene answers unambiguously (module docstring), as QA records."""
    out = [QA("count", "How many objects are there?", COUNTS[len(scene.objects) - 1], COUNTS)]
    for obj in scene.objects:
        out.append(QA("shape", f"What shape is the {obj.colour} object?", obj.shape, SHAPES))
        out.append(QA("colour", f"What colour is the {obj.shape}?", obj.colour, COLOURS))
        if obj.event == "changes_colour":
            out.append(QA("final_colour", f"What colour is the {obj.shape} at the end?", obj.new_colour, COLOURS))
        if obj.direction:
            out.append(QA("direction", f"Which way does the {obj.name()} move?", obj.direction, DIRECTIONS))
    timed = [o for o in scene.objects if o.event in ("appears", "changes_colour")]
    for a in timed:
        for b in timed:
            if a is not b and a.event_t < b.event_t:
                pa, pb = _event_phrase(a), _event_phrase(b)
                out.append(QA("first", f"What happened first: {pa} or {pb}?", pa, (pa, pb)))
    return out


# ---------------------------------------------------------------------------------------- the oracle

_Q_SHAPE = re.compile(r"What shape is the (\w+) object\?")
_Q_COLOUR = re.compile(r"What colour is the (\w+)( at the end)?\?")
_Q_DIRECTION = re.compile(r"Which way does the (\w+) (\w+) move\?")
_Q_FIRST = re.compile(r"What happened first: (.+) or (.+)\?")


def oracle(scene: Scene, question: str) -> str:
    """The answer read from the scene's state (not from `questions`' records): parses the question, finds
    the object it names and reads the field, re-deriving event order from the event frames. Raises
    ValueError for a question it cannot parse or an object the scene does not hold."""
    def find(**want):
        hits = [o for o in scene.objects if all(getattr(o, k) == v for k, v in want.items())]
        if len(hits) != 1:
            raise ValueError(f"{question!r}: {len(hits)} objects match {want}")
        return hits[0]

    if question == "How many objects are there?":
        seen = [o for o in scene.objects if any(o.visible(t) for t in range(scene.n_frames))]
        return COUNTS[len(seen) - 1]
    if m := _Q_SHAPE.fullmatch(question):
        return find(colour=m.group(1)).shape
    if m := _Q_COLOUR.fullmatch(question):
        obj = find(shape=m.group(1))
        if m.group(2):
            return obj.colour_at(scene.n_frames - 1)
        return obj.colour_at(obj.first_seen(scene.n_frames))
    if m := _Q_DIRECTION.fullmatch(question):
        obj = find(colour=m.group(1), shape=m.group(2))
        (x0, y0), (x1, y1) = obj.centre(0), obj.centre(scene.n_frames - 1)
        dx, dy = x1 - x0, y1 - y0
        return ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
    if m := _Q_FIRST.fullmatch(question):
        times = {}
        for phrase in m.groups():
            pm = re.fullmatch(r"the (\w+) (\w+) (appeared|turned \w+|left the frame)", phrase)
            if not pm:
                raise ValueError(f"{question!r}: cannot read the event {phrase!r}")
            obj = find(colour=pm.group(1), shape=pm.group(2))
            # the first frame where the described change is visible (None: it never happens)
            frames = range(scene.n_frames)
            if pm.group(3) == "appeared":
                seen = obj.first_seen(scene.n_frames)
                times[phrase] = seen if seen else None
            elif pm.group(3).startswith("turned"):
                times[phrase] = next((t for t in frames if obj.colour_at(t) == pm.group(3)[7:] != obj.colour), None)
            else:
                times[phrase] = next((t for t in frames if t and not obj.visible(t)), None)
            if times[phrase] is None:
                raise ValueError(f"{question!r}: {phrase!r} does not happen in the scene")
        a, b = m.groups()
        if times[a] == times[b]:
            raise ValueError(f"{question!r}: both events at frame {times[a]}")
        return a if times[a] < times[b] else b
    raise ValueError(f"cannot parse the question {question!r}")


# --------------------------------------------------------------------------------------- pixel rules

def _foreground(frame: np.ndarray) -> np.ndarray:
    """(R, R) bool: pixels farther than 60 (L1 over RGB) from the background."""
    return np.abs(frame.astype(np.int32) - np.asarray(BACKGROUND)).sum(-1) > 60


def read_colour(frame: np.ndarray) -> Optional[str]:
    """The palette colour nearest (squared RGB distance) to most foreground pixels of a (R, R, 3) uint8
    frame; None when it has no foreground."""
    fg = frame[_foreground(frame)].astype(np.float64)
    if not len(fg):
        return None
    pal = np.asarray([PALETTE[c] for c in COLOURS], np.float64)
    nearest = ((fg[:, None, :] - pal[None]) ** 2).sum(-1).argmin(-1)
    return COLOURS[int(np.bincount(nearest, minlength=len(COLOURS)).argmax())]


def read_shape(frame: np.ndarray) -> Optional[str]:
    """The shape of the foreground of a one-object frame, from its fill ratio in its bounding box: >= 0.9
    square, >= 0.64 circle (pi/4 = 0.785), else triangle (0.5); None without foreground."""
    fg = _foreground(frame)
    if not fg.any():
        return None
    rows, cols = np.nonzero(fg)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = fg.sum() / box
    return "square" if fill >= 0.9 else "circle" if fill >= 0.64 else "triangle"


def read_direction(frames: np.ndarray) -> Optional[str]:
    """The direction of the foreground centroid's path from the first frame with foreground to the last
    (the larger of the x and y moves; y down); None when fewer than two frames have foreground or it does
    not move by a pixel."""
    cents = []
    for frame in frames:
        fg = _foreground(frame)
        if fg.any():
            rows, cols = np.nonzero(fg)
            cents.append((cols.mean(), rows.mean()))
    if len(cents) < 2:
        return None
    dx, dy = cents[-1][0] - cents[0][0], cents[-1][1] - cents[0][1]
    if max(abs(dx), abs(dy)) < 1:
        return None
    return ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")


# ---------------------------------------------------------------------------------- training records

def records(scene: Scene, codes: Sequence[int], kinds: Sequence[str] = ("text_to_video", "video_to_text", "qa"),
            qa_limit: Optional[int] = None) -> list:
    """The original's vision-text JSON examples of one scene (lwm.training.data_sources, `fields_from_example
    ='fields'`), their text in the chat template the evaluations prompt with, so a record tokenizes to the
    eval's prompt token for token (lwm.text.chat_template; the processor tokenizes each field on its own).
    codes: the scene's VQGAN codes, flat (T * codes per frame).
      text_to_video  {"vision", "prompt": user_turn_text("Generate a video of {caption}") (an image: "an
                     image"), "fields": "[prompt],vision"}: loss on the video
      video_to_text  {"vision", "head", "tail", "answer": caption, "fields": "[head],[vision],[tail],answer"},
                     (head, tail) = vision_chat_text("Describe the video."): loss on the caption
      qa             the same shape with the question's head and its answer, for each of questions(scene)
                     (at most qa_limit)"""
    from lwm.text.chat_template import user_turn_text, vision_chat_text

    codes = [int(c) for c in codes]
    media = "image" if scene.is_image else "video"
    out = []

    def answered(question: str, answer: str) -> dict:
        head, tail = vision_chat_text(question)
        return {"vision": codes, "head": head, "tail": tail, "answer": answer,
                "fields": "[head],[vision],[tail],answer"}

    if "text_to_video" in kinds:
        out.append({"vision": codes, "prompt": user_turn_text(f"Generate {'an' if scene.is_image else 'a'} "
                                                              f"{media} of {caption(scene)}", first=True),
                    "fields": "[prompt],vision"})
    if "video_to_text" in kinds:
        out.append(answered(f"Describe the {media}.", caption(scene)))
    if "qa" in kinds:
        out.extend(answered(qa.question, qa.answer) for qa in questions(scene)[:qa_limit])
    return out


def chance(qas: Sequence[QA]) -> float:
    """The expected accuracy of a uniform random answerer over each question's answer set."""
    return float(np.mean([1.0 / len(q.choices) for q in qas])) if qas else math.nan
