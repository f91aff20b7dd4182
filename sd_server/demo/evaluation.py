"""Measures whether the demo model draws what its prompts say: renders prompts over every colour, shape and
background, reads each picture back with the world's evaluator, and counts what matches."""

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image

from sd_server.demo.world import (
    Scene,
    evaluation_scenes,
    prompt,
    read,
)

if TYPE_CHECKING:  # the scoring runs without torch (the unit tier); only rendering needs it
    from diffusers import StableDiffusionPipeline

ATTRIBUTES = ("colour", "background", "shape")
TARGETS = {"colour": 0.9, "background": 0.9, "shape": 0.8, "held_out": 0.7}


@dataclass
class Score:
    """Matches per attribute, for the seen and the held-out colour/shape pairs."""

    hits: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, scene: Scene, image: Image.Image) -> bool:
        """Read ``image`` and count what matches ``scene``; True when everything does."""
        reading = read(image)
        group = "held_out" if scene.held_out else "seen"
        self.counts[group] += 1
        matches = {attribute: getattr(reading, attribute) == getattr(scene, attribute) for attribute in ATTRIBUTES}
        for attribute, matched in matches.items():
            self.hits[group][attribute] += matched
        self.hits[group]["all"] += all(matches.values())
        return all(matches.values())

    def accuracy(self, group: str, attribute: str) -> float:
        """Share of the group's pictures whose attribute matched."""
        return self.hits[group][attribute] / self.counts[group] if self.counts[group] else 0.0

    def meets_targets(self) -> bool:
        """Colour, background and shape of the seen pairs, and whole pictures of the held-out pairs, on target."""
        seen = all(self.accuracy("seen", attribute) >= TARGETS[attribute] for attribute in ATTRIBUTES)
        return seen and self.accuracy("held_out", "all") >= TARGETS["held_out"]

    def report(self) -> str:
        """A table of accuracies per attribute and group."""
        lines = [f"{'':10}{'pictures':>9}" + "".join(f"{name:>12}" for name in (*ATTRIBUTES, "all"))]
        for group in ("seen", "held_out"):
            row = "".join(f"{self.accuracy(group, name):>12.1%}" for name in (*ATTRIBUTES, "all"))
            lines.append(f"{group:10}{self.counts[group]:>9}{row}")
        lines.append(f"targets: colour {TARGETS['colour']:.0%}, background {TARGETS['background']:.0%}, shape "
                     f"{TARGETS['shape']:.0%} (seen pairs); held-out pairs {TARGETS['held_out']:.0%} all correct")
        return "\n".join(lines)


def evaluate(
    pipeline: "StableDiffusionPipeline", count: int, seed: int = 0, steps: int = 20, size: int = 256, guidance_scale: float = 7.5
) -> tuple[Score, list[tuple[Scene, Image.Image]]]:
    """Render ``count`` prompts (seed ``seed + i`` for the i-th) and score them; returns the score and the pictures."""
    import torch

    score, pictures = Score(), []
    for index, scene in enumerate(evaluation_scenes(count, seed)):
        image = pipeline(
            prompt(scene),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            width=size,
            height=size,
            generator=torch.Generator("cpu").manual_seed(seed + index),
        ).images[0]
        score.add(scene, image)
        pictures.append((scene, image))
    return score, pictures


def grid(pictures: list[tuple[Scene, Image.Image]], columns: int = 6, cell: int = 128) -> Image.Image:
    """The pictures side by side, ``columns`` a row, each scaled to ``cell`` pixels."""
    rows = (len(pictures) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell, rows * cell), (255, 255, 255))
    for index, (_, image) in enumerate(pictures):
        sheet.paste(image.resize((cell, cell)), ((index % columns) * cell, (index // columns) * cell))
    return sheet
