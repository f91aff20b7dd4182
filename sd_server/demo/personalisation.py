"""How well a user's LoRA trained on the demo model generalises, read with the world's evaluator: the subject drawn
in contexts its photos never showed (other backgrounds, other sizes: recontextualisation, as DreamBooth measures
it), and prompts without the trigger drawn as before the training (no language drift). A training on the demo
model has its final samples scored the same way (``score_samples``, the recipe's "demo-world" evaluator)."""

import io
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from sd_server.demo.world import BACKGROUNDS, Reading, Scene, draw, evaluation_scenes, prompt, read
from sd_server.domain.trainings import TrainingSettings

SUBJECT = Scene("triangle", "yellow", "white", position="center")  # the photos' subject: centred, on white
SMALL_AREA, LARGE_AREA = 0.045, 0.105  # a triangle's area share: small ones stay under, large ones over
NEW_BACKGROUNDS = tuple(name for name in BACKGROUNDS if name != SUBJECT.background)
Draw = Callable[[list[tuple[str, int]]], list[Image.Image]]  # (prompt, seed) pairs -> their pictures, in order


@dataclass(frozen=True)
class Context:
    """A prompt template (with ``{trigger}`` and ``{class_word}``) that puts the subject somewhere new, and what the
    picture must show."""

    template: str
    background: str
    size: str | None = None

    def shows_subject(self, reading: Reading, subject: Scene) -> bool:
        """True when the reading is the subject (its colour and shape) on this background, at this size."""
        if (reading.colour, reading.shape, reading.background) != (subject.colour, subject.shape, self.background):
            return False
        if self.size == "small":
            return reading.area < SMALL_AREA
        return reading.area > LARGE_AREA if self.size == "large" else True


def new_contexts() -> list[Context]:
    """The subject on each background it was never photographed on, and small and large on its own."""
    backgrounds = [Context(f"a {{trigger}} {{class_word}} on a {name} background", name) for name in NEW_BACKGROUNDS]
    sizes = [
        Context(f"a {size} {{trigger}} {{class_word}} on a {SUBJECT.background} background", SUBJECT.background, size) for size in ("small", "large")
    ]
    return backgrounds + sizes


def subject_photos(count: int, seed: int = 0, size: int = 256, subject: Scene = SUBJECT) -> list[Image.Image]:
    """``count`` photos of the subject, its size and place varying a little as in real photos."""
    rng = random.Random(seed)
    return [draw(subject, rng, size) for _ in range(count)]


def drift_prompts(count: int = 40, seed: int = 1000) -> list[str]:
    """``count`` fixed prompts of the world without any trigger, over every colour, shape and background."""
    return [prompt(scene) for scene in evaluation_scenes(count, seed)]


def essentials(reading: Reading) -> tuple[str | None, str | None, str]:
    """What a drift check compares: the colour, shape and background read."""
    return reading.colour, reading.shape, reading.background


@dataclass(frozen=True)
class Generalisation:
    """Shares of pictures: the subject in new contexts (per context and in all) after the training and, for the
    same prompts, before it; prompts without the trigger unchanged by the training."""

    in_context: dict[str, float]
    in_context_before: dict[str, float]
    unchanged: float

    @property
    def recontextualisation(self) -> float:
        """The subject's share over every new context, after the training."""
        return sum(self.in_context.values()) / len(self.in_context)

    @property
    def recontextualisation_before(self) -> float:
        """The same share, drawn by the base before the training (the trigger alone means nothing yet)."""
        return sum(self.in_context_before.values()) / len(self.in_context_before)

    def as_dict(self) -> dict[str, object]:
        """The figures, rounded for a report."""
        return {
            "recontextualisation": round(self.recontextualisation, 3),
            "recontextualisation_before": round(self.recontextualisation_before, 3),
            "in_context": {name: round(share, 3) for name, share in self.in_context.items()},
            "in_context_before": {name: round(share, 3) for name, share in self.in_context_before.items()},
            "prompts_unchanged": round(self.unchanged, 3),
        }


def recontextualisation(
    draw_trained: Draw, trigger: str, class_word: str, seeds: Iterable[int], subject: Scene = SUBJECT
) -> dict[str, float]:
    """Per new context (its prompt), the share of ``seeds`` whose picture shows the subject there (every picture
    asked of ``draw_trained`` at once, so that a drawer may batch them)."""
    seeds = list(seeds)
    contexts = {" ".join(c.template.replace("{trigger}", trigger).replace("{class_word}", class_word).split()): c for c in new_contexts()}
    pictures = draw_trained([(text, seed) for text in contexts for seed in seeds])
    shares = {}
    for index, (text, context) in enumerate(contexts.items()):
        its_pictures = pictures[index * len(seeds) : (index + 1) * len(seeds)]
        shares[text] = sum(context.shows_subject(read(picture), subject) for picture in its_pictures) / len(seeds)
    return shares


def unchanged_share(draw_before: Draw, draw_after: Draw, prompts: list[str]) -> float:
    """Share of ``prompts`` (the i-th drawn with seed i) read the same before and after the training."""
    requests = [(text, seed) for seed, text in enumerate(prompts)]
    pairs = zip(draw_before(requests), draw_after(requests), strict=True)
    return sum(essentials(read(before)) == essentials(read(after)) for before, after in pairs) / len(prompts)


def generalisation(
    draw_before: Draw, draw_after: Draw, trigger: str, class_word: str, seeds: Iterable[int], prompts: list[str]
) -> Generalisation:
    """Recontextualisation and drift of a trained model, measured against its base."""
    seeds = list(seeds)
    return Generalisation(
        recontextualisation(draw_after, trigger, class_word, seeds),
        recontextualisation(draw_before, trigger, class_word, seeds),
        unchanged_share(draw_before, draw_after, prompts),
    )


def subject_of(photos: list[Image.Image]) -> Scene | None:
    """The subject the photos show, as the evaluator reads them: the colour and shape most of them read as, on
    their most common background (None when no shape is read in most of them)."""
    readings = [read(photo) for photo in photos]
    shapes = Counter((reading.colour, reading.shape) for reading in readings if reading.shape)
    if not shapes:
        return None
    (colour, shape), count = shapes.most_common(1)[0]
    if count * 2 <= len(readings) or colour is None or shape is None:
        return None
    background = Counter(reading.background for reading in readings).most_common(1)[0][0]
    return Scene(shape, colour, background)


def context_of(prompt_text: str, subject: Scene) -> Context:
    """What a sample's prompt asks of the picture: the background it names (else the photos'), the size word."""
    words = prompt_text.split()
    background = next((words[index - 1] for index, word in enumerate(words) if word == "background" and index > 0), subject.background)
    size = next((word for word in words if word in ("small", "large")), None)
    return Context(prompt_text, background if background in BACKGROUNDS else subject.background, size)


def score_samples(photos: list[Path], samples: list[Image.Image | bytes], settings: TrainingSettings) -> dict[str, object]:
    """The demo evaluator's reading of a training's final samples (pictures, or PNGs from the Ray engine): the subject
    its photos show, and for each sample (its prompt), what it reads and whether that is the subject where the prompt
    put it."""
    pictures = []
    for path in photos:
        with Image.open(path) as photo:
            pictures.append(photo.convert("RGB"))
    subject = subject_of(pictures)
    if subject is None:
        return {"evaluator": "demo-world", "subject": None, "note": "the photos show no one shape of the demo world"}
    rows = []
    for text, sample in zip(settings.sample_prompts, samples):
        reading = read(sample if isinstance(sample, Image.Image) else Image.open(io.BytesIO(sample)))
        shown = context_of(text, subject).shows_subject(reading, subject)
        rows.append({"prompt": text, "read": f"{reading.colour} {reading.shape} on {reading.background}", "shows_subject": shown})
    return {
        "evaluator": "demo-world",
        "subject": f"{subject.colour} {subject.shape}",
        "samples": rows,
        "subject_shown": round(sum(row["shows_subject"] for row in rows) / len(rows), 3),
    }
