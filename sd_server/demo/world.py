"""The demo model's world: flat shapes of one colour on a plain background, the prompts that describe them,
and an evaluator that reads a picture back with plain image measurements."""

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (245, 215, 40),
    "orange": (245, 135, 25),
    "purple": (140, 50, 190),
}
BACKGROUNDS = {"white": (240, 240, 240), "black": (20, 20, 20), "gray": (128, 128, 128), "blue": (70, 110, 200)}
SIZES = {"small": (0.10, 0.14), "large": (0.24, 0.30)}  # half-extent as a fraction of the image side
MEDIUM = (0.16, 0.22)
# Where shapes may stand: the autoencoder learns from shapes anywhere; the prompts speak of centred ones.
POSITIONS = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72), "center": (0.5, 0.5)}
HELD_OUT = frozenset({("purple", "triangle"), ("orange", "circle"), ("green", "square")})  # never drawn in training
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    """One picture of the world: a shape of a colour, of a size, at a place, on a background."""

    shape: str
    colour: str
    background: str
    size: str | None = None  # None: medium
    position: str | None = None  # None: anywhere it fits

    @property
    def held_out(self) -> bool:
        """True when its colour and shape make a pair the model never saw drawn."""
        return (self.colour, self.shape) in HELD_OUT


def prompt(scene: Scene, with_colour: bool = True, with_shape: bool = True, with_background: bool = True) -> str:
    """The prompt that describes ``scene``, e.g. "a large red circle on a blue background"."""
    words = ["a"]
    if scene.size:
        words.append(scene.size)
    if with_colour:
        words.append(scene.colour)
    words.append(scene.shape if with_shape else "shape")
    if with_background:
        words += ["on", "a", scene.background, "background"]
    return " ".join(words)


def possible(colour: str, background: str) -> bool:
    """A shape must stand out from its background: never a blue shape on the blue background."""
    return colour != background


def every_scene() -> list[Scene]:
    """One scene for each possible colour, shape and background (held-out pairs included)."""
    return [Scene(shape, colour, background) for shape in SHAPES for colour in COLOURS for background in BACKGROUNDS if possible(colour, background)]


def evaluation_scenes(count: int, seed: int) -> list[Scene]:
    """``count`` scenes cycling through every possible colour, shape and background (held-out pairs included),
    in an order drawn from ``seed``."""
    combos = every_scene()
    random.Random(seed).shuffle(combos)
    return [combos[index % len(combos)] for index in range(count)]


def random_scene(rng: random.Random, include_held_out: bool = False, detailed: float = 0.5) -> Scene:
    """A scene drawn at random; held-out colour/shape pairs only when asked; size and position words
    each with probability ``detailed``."""
    while True:
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        background = rng.choice(list(BACKGROUNDS))
        if possible(colour, background) and (include_held_out or (colour, shape) not in HELD_OUT):
            break
    size = rng.choice(list(SIZES)) if rng.random() < detailed else None
    position = rng.choice(list(POSITIONS)) if rng.random() < detailed else None
    return Scene(shape, colour, background, size, position)


def prompted_scene(rng: random.Random, sized: float = 0.3) -> Scene:
    """A scene as the prompts describe them, for the denoiser: centred, a size word with probability ``sized``,
    never a held-out colour/shape pair."""
    scene = random_scene(rng, detailed=0.0)
    size = rng.choice(list(SIZES)) if rng.random() < sized else None
    return Scene(scene.shape, scene.colour, scene.background, size, "center")


def draw(scene: Scene, rng: random.Random, resolution: int = 256) -> Image.Image:
    """Render ``scene``: its size and place drawn within the ranges its words allow."""
    low, high = SIZES.get(scene.size or "", MEDIUM)
    half = rng.uniform(low, high)
    if scene.position:
        anchor_x, anchor_y = POSITIONS[scene.position]
        centre_x, centre_y = anchor_x + rng.uniform(-0.05, 0.05), anchor_y + rng.uniform(-0.05, 0.05)
    else:
        centre_x, centre_y = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)
    centre_x, centre_y = (min(max(value, half + 0.02), 0.98 - half) for value in (centre_x, centre_y))
    side = resolution * SUPERSAMPLE
    image = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    canvas = ImageDraw.Draw(image)
    x, y, r = centre_x * side, centre_y * side, half * side
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        canvas.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif scene.shape == "square":
        canvas.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    else:  # an upright triangle, as wide as it is tall
        canvas.polygon(((x, y - r), (x + r, y + r), (x - r, y + r)), fill=fill)
    return image.resize((resolution, resolution), Image.Resampling.BOX)


@dataclass(frozen=True)
class Reading:
    """What the evaluator sees in a picture."""

    background: str
    colour: str | None  # None: no shape found
    shape: str | None
    area: float  # of the shape, as a fraction of the picture


def nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]], exclude: str | None = None) -> str:
    """The palette name whose colour is closest to ``rgb``."""
    names = [name for name in palette if name != exclude]
    distances = [np.sum((rgb - np.array(palette[name], dtype=np.float64)) ** 2) for name in names]
    return names[int(np.argmin(distances))]


# Shape prototypes: (filled share of the bounding box, share of the shape in the top half of the box).
SHAPE_FEATURES = {"square": (1.0, 0.5), "circle": (np.pi / 4, 0.5), "triangle": (0.5, 0.25)}
MIN_AREA = 0.004  # smaller blobs than this are noise, not a shape
BORDER = 4  # pixels: the frame the background is read from; shapes keep 2 % of the side off the edge


def extent(profile: np.ndarray) -> tuple[int, int]:
    """First and last index where a mask's row (or column) count reaches 5 % of its largest: stray pixels
    outside the shape do not stretch its box."""
    indices = np.nonzero(profile >= 0.05 * profile.max())[0]
    return int(indices[0]), int(indices[-1])


def read(image: Image.Image) -> Reading:
    """Background from the border's median colour; the shape's mask (pixels inside the border, far from the
    background); its colour from the mask's median, its shape from how it fills its bounding box and how its mass
    splits top to bottom."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    frame = (pixels[:BORDER], pixels[-BORDER:], pixels[:, :BORDER], pixels[:, -BORDER:])
    border = np.concatenate([side.reshape(-1, 3) for side in frame])
    background_rgb = np.median(border, axis=0)
    background = nearest(background_rgb, BACKGROUNDS)
    mask = np.sqrt(np.sum((pixels - background_rgb) ** 2, axis=2)) > 60
    mask[:BORDER], mask[-BORDER:], mask[:, :BORDER], mask[:, -BORDER:] = False, False, False, False
    area = float(mask.mean())
    if area < MIN_AREA:
        return Reading(background, None, None, area)
    colour = nearest(np.median(pixels[mask], axis=0), COLOURS)
    top, bottom = extent(mask.sum(axis=1))
    left, right = extent(mask.sum(axis=0))
    box = mask[top : bottom + 1, left : right + 1]
    fill = box.mean()
    upper = box[: (bottom - top + 1) // 2].sum() / max(box.sum(), 1)
    features = np.array([fill, upper])
    shape = min(SHAPE_FEATURES, key=lambda name: np.sum((features - np.array(SHAPE_FEATURES[name])) ** 2))
    return Reading(background, colour, shape, area)
