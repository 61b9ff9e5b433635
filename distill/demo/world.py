"""The demo world: one coloured shape on a flat background, with a caption that leaves some attributes open.

A scene has a shape, a colour, a background, a 3x3 grid cell, an exact centre inside that cell and a radius. Its
caption mentions a random subset of the attributes ("a red circle at the top left", "a shape on a black
background"); whatever it leaves open is random. So the image distribution of one caption is multimodal (several
backgrounds, shapes or colours, positions spread over a cell or the whole image): a few-step sampler that averages
the modes draws a blurred, off-palette mixture, which is what SCFM has to fix and what `read_image` measures.

Everything is numpy and deterministic given the seed of a `numpy.random.Generator`. `read_image` is the world's
checker: it recovers the attributes from a rendered or generated image, so prompt adherence and crispness can be
scored without any learned model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import numpy as np

from sampling.demo import IMAGE_SIZE

SIZE = IMAGE_SIZE  # image side in pixels (64)
SUPERSAMPLE = 4  # shapes are rendered at 4x and box-filtered, so edges are anti-aliased like real images

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 240),
    "black": (20, 20, 25),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "diamond", "ring")
# Cells of the 3x3 grid, row by row; the phrase is what the caption says after "a ... shape".
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
_PHRASES = {"top": "at the top", "left": "at the left", "center": "in the center", "right": "at the right",
            "bottom": "at the bottom"}
# Radius ranges; an unmentioned size is U(8, 16). Below 8 px the demo VAE rounds every small shape into a disc.
SIZES = {"small": (8.0, 10.5), "large": (13.5, 16.0)}
RADIUS = (8.0, 16.0)
SIZE_SPLIT = (SIZES["small"][1] + SIZES["large"][0]) / 2
# How often the caption mentions each attribute; the rest of the time the attribute is open (random). The grid cell
# is always named (the exact position inside it stays open): with the cell open too, a teacher small enough to train
# on a CPU never learnt to commit to one location and drew scattered blobs; colour, shape, background and size
# still leave plenty of modes open.
MENTION_P = {"colour": 0.7, "shape": 0.7, "position": 1.0, "background": 0.5, "size": 0.25}
ATTRIBUTES = ("shape", "colour", "background", "position", "size")
PALETTE = np.array(list(COLOURS.values()) + list(BACKGROUNDS.values()), dtype=np.float32)  # (8, 3)
# The variant world (the "style" of the own-LoRA demo): the same scenes and captions, every shape drawn in another
# colour of the palette: red ones blue, blue green, green yellow, yellow purple, purple red. A swap of the palette,
# not new colours: the demo VAE, trained on this palette alone, cannot draw others (pastels come back out of it
# as the nearest palette colour), so a LoRA on the transformer could never learn them.
VARIANT_SWAP = {"red": "blue", "blue": "green", "green": "yellow", "yellow": "purple", "purple": "red"}
WORLDS = {"base": COLOURS, "variant": {name: COLOURS[VARIANT_SWAP[name]] for name in COLOURS}}


def colours_of(world: str) -> dict[str, tuple[int, int, int]]:
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; one of {', '.join(WORLDS)}")
    return WORLDS[world]


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    position: str  # one of POSITIONS: the cell holding the shape's centre
    cx: float  # centre in pixels
    cy: float
    radius: float  # every shape fits in the disc of this radius around (cx, cy)
    mentioned: frozenset[str] = field(default_factory=frozenset)

    @property
    def size(self) -> str:
        # the midpoint between the two ranges, so a read-back radius a little off still names the right size
        return "small" if self.radius <= SIZE_SPLIT else "large"

    @property
    def caption(self) -> str:
        return caption(self)


# ---------------------------------------------------------------------------------------------- sampling


def _cell_range(cell: int, radius: float, size: int = SIZE) -> tuple[float, float]:
    """Centre coordinates along one axis that lie in `cell` (0, 1, 2) and keep the shape inside the image."""
    # a pixel's margin from the cell edges, so the checker's pixel-grid centroid lands in the same cell
    lo, hi = cell * size / 3 + 1.0, (cell + 1) * size / 3 - 1.0
    return max(lo, radius), min(hi, size - radius)


def sample_scene(rng: np.random.Generator, *, prompt: dict | None = None, size: int = SIZE) -> Scene:
    """A random scene. `prompt` fixes attributes (as `parse_caption` returns them); the rest are drawn.

    Without `prompt`, which attributes the caption mentions is drawn too (MENTION_P), so captions of sampled scenes
    cover everything from "a shape" to "a large red circle at the top left on a white background".
    """
    if prompt is None:
        mentioned = frozenset(a for a in ATTRIBUTES if rng.random() < MENTION_P[a])
        fixed = {}
    else:
        mentioned, fixed = frozenset(prompt), dict(prompt)
    shape = fixed.get("shape") or SHAPES[rng.integers(len(SHAPES))]
    colour = fixed.get("colour") or list(COLOURS)[rng.integers(len(COLOURS))]
    background = fixed.get("background") or list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    position = fixed.get("position") or POSITIONS[rng.integers(len(POSITIONS))]
    if "size" in mentioned and "size" not in fixed:
        fixed["size"] = "small" if rng.random() < 0.5 else "large"
    lo, hi = SIZES[fixed["size"]] if "size" in fixed else RADIUS
    radius = float(rng.uniform(lo, hi))
    row, col = divmod(POSITIONS.index(position), 3)
    cx = float(rng.uniform(*_cell_range(col, radius, size)))
    cy = float(rng.uniform(*_cell_range(row, radius, size)))
    return Scene(shape, colour, background, position, cx, cy, radius, mentioned)


def caption(scene: Scene) -> str:
    """"a [small|large] [colour] [shape|'shape'] [at the <position>] [on a <background> background]"."""
    m = scene.mentioned
    words = ["a"]
    if "size" in m:
        words.append(scene.size)
    if "colour" in m:
        words.append(scene.colour)
    words.append(scene.shape if "shape" in m else "shape")
    if "position" in m:
        words.append(position_phrase(scene.position))
    if "background" in m:
        words.append(f"on a {scene.background} background")
    return " ".join(words)


def position_phrase(position: str) -> str:
    return _PHRASES.get(position, f"at the {position}")


_CAPTION = re.compile(
    r"^a (?:(?P<size>small|large) )?(?:(?P<colour>" + "|".join(COLOURS) + r") )?(?P<shape>"
    + "|".join(SHAPES) + r"|shape)(?: (?:at|in) the (?P<position>" + "|".join(sorted(POSITIONS, key=len)[::-1])
    + r"))?(?: on a (?P<background>" + "|".join(BACKGROUNDS) + r") background)?$"
)


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a caption (or a user prompt in the same grammar) fixes; raises ValueError otherwise."""
    m = _CAPTION.match(text.strip().lower())
    if m is None:
        raise ValueError(f"not a caption of the demo world: {text!r}")
    out = {k: v for k, v in m.groupdict().items() if v is not None}
    if out.get("shape") == "shape":
        del out["shape"]
    return out


def sample(seed: int, n: int, *, size: int = SIZE, world: str = "base") -> tuple[np.ndarray, list[str], list[Scene]]:
    """n scenes from one seed: images (n, size, size, 3) uint8, captions, scenes (the same in every world)."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, size=size) for _ in range(n)]
    return np.stack([render(s, size, world) for s in scenes]), [s.caption for s in scenes], scenes


def sample_for_prompt(prompt: str, seed: int, n: int = 1, *, size: int = SIZE,
                      world: str = "base") -> tuple[np.ndarray, list[Scene]]:
    """n images of one caption, the open attributes drawn from `seed`: the caption's ground-truth distribution."""
    fixed = parse_caption(prompt)
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, prompt=fixed, size=size) for _ in range(n)]
    return np.stack([render(s, size, world) for s in scenes]), scenes


# ---------------------------------------------------------------------------------------------- rendering


def shape_mask(shape: str, cx: float, cy: float, radius: float, size: int | tuple[int, int] = SIZE,
               supersample: int = 1) -> np.ndarray:
    """Coverage in [0, 1] of each pixel (size, size), or (height, width) for a `size` of (height, width),
    averaged over supersample^2 sub-pixel centres."""
    height, width = (size, size) if isinstance(size, int) else size
    # sub-pixel centres in pixel units, along each axis
    cols = (np.arange(width * supersample, dtype=np.float32) + 0.5) / supersample
    rows = (np.arange(height * supersample, dtype=np.float32) + 0.5) / supersample
    x, y = cols[None, :] - cx, rows[:, None] - cy
    r = radius
    if shape == "circle":
        inside = x * x + y * y <= r * r
    elif shape == "ring":
        d2 = x * x + y * y
        inside = (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    elif shape == "square":
        h = r * 0.7071  # half side: the square is inscribed in the disc of radius r
        inside = (np.abs(x) <= h) & (np.abs(y) <= h)
    elif shape == "diamond":
        inside = np.abs(x) + np.abs(y) <= r
    elif shape == "triangle":
        # equilateral, inscribed in the disc: apex at -r, base at +r/2, so its centroid is the centre
        t = (y + r) / (1.5 * r)  # 0 at the apex, 1 at the base
        inside = (t >= 0) & (t <= 1) & (np.abs(x) <= t * r * 0.8660)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    m = inside.astype(np.float32)
    if supersample > 1:
        m = m.reshape(height, supersample, width, supersample).mean(axis=(1, 3))
    return m


def render(scene: Scene, size: int = SIZE, world: str = "base") -> np.ndarray:
    """The scene as an (size, size, 3) uint8 image, its shape in `world`'s colours."""
    a = shape_mask(scene.shape, scene.cx, scene.cy, scene.radius, size, SUPERSAMPLE)[..., None]
    fg = np.array(colours_of(world)[scene.colour], dtype=np.float32)
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    return np.round(a * fg + (1 - a) * bg).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- checking


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> tuple[str, float]:
    names = list(table)
    d = np.linalg.norm(np.array([table[k] for k in names], dtype=np.float32) - rgb, axis=1)
    return names[int(d.argmin())], float(d.min())


def crispness(image: np.ndarray) -> float:
    """Mean distance (0..1, per channel /255) of each pixel to the nearest palette colour (every world draws from
    the same palette): blur and washed-out colours score high, a rendered image scores only its anti-aliased edge
    pixels."""
    px = image.reshape(-1, 3).astype(np.float32)
    d = np.linalg.norm(px[:, None, :] - PALETTE[None], axis=2).min(axis=1)
    return float(d.mean() / 255.0)


def read_image(image: np.ndarray, world: str = "base") -> dict:
    """Recover a scene's attributes from an (H, W, 3) uint8 image of `world` (rendered or generated).

    Background: the median border colour, nearest palette entry. Shape pixels: those far from the background.
    Colour: the median shape pixel. Position: the cell of the shape pixels' centroid (thirds of the width and of the
    height, as the caption's grid stretches with the image). Shape and size: the template
    (shape, radius) at that centroid with the best IoU against the shape pixels. `found` is False when there is no
    shape at all; `iou` tells how well the best template fits (low for blobs and mixtures). The colour is named as
    `world` draws it (in the variant, a blue shape is a red one).
    """
    img = image.astype(np.float32)
    height, width = img.shape[:2]  # `evaluate --out --width W --height H` draws the demo's prompts at any size
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    background, _ = _nearest(np.median(border, axis=0), BACKGROUNDS)
    bg = np.array(BACKGROUNDS[background], dtype=np.float32)
    mask = np.linalg.norm(img - bg, axis=2) > 60.0  # half-way-ish between any background and any shape colour
    out = dict(background=background, found=bool(mask.sum() >= 9), crispness=crispness(image))
    if not out["found"]:
        return dict(out, shape=None, colour=None, position=None, size=None, radius=0.0, iou=0.0)
    colour, _ = _nearest(np.median(img[mask], axis=0), colours_of(world))
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    col, row = min(int(cx * 3 // width), 2), min(int(cy * 3 // height), 2)
    best = (-1.0, "circle", 0.0)
    for shape in SHAPES:
        for r in np.arange(RADIUS[0] - 2, RADIUS[1] + 2.01, 0.5):
            t = shape_mask(shape, cx, cy, float(r), (height, width)) > 0.5
            iou = (t & mask).sum() / max((t | mask).sum(), 1)
            if iou > best[0]:
                best = (float(iou), shape, float(r))
    iou, shape, radius = best
    probe = Scene(shape, colour, background, POSITIONS[row * 3 + col], cx, cy, radius)
    return dict(out, shape=shape, colour=colour, position=probe.position, size=probe.size, radius=radius, iou=iou)


def adheres(read: dict, prompt: dict[str, str]) -> bool:
    """Whether an image's read attributes satisfy every attribute the prompt fixes (and a shape was found)."""
    if not read["found"]:
        return False
    return all(read[k] == v for k, v in prompt.items())


def with_mentions(scene: Scene, mentioned: set[str] | frozenset[str]) -> Scene:
    return replace(scene, mentioned=frozenset(mentioned))
