"""Training quality benchmark: does a user's LoRA, trained from photos on the demo model, generalise?

Trains a LoRA from photos of one subject (a yellow triangle, on white) with the recipe the demo model ships
(models/demo/training_defaults.json) or the options given, then reads pictures back with the demo evaluator:
the subject in new contexts (black, blue and gray backgrounds, small and large: recontextualisation) and prompts
without the trigger drawn as the base drew them (no language drift). Prints the figures and the time the
training took; the same LoRA is loaded the way the server loads it (load_lora_weights).

Usage: python benchmarks/bench_training_quality.py [--steps N] [--seeds 10] [--drift-prompts 40] [--json FILE]
       [--prior-loss-weight W] [--class-images N] [--learning-rate LR] ...
"""

import argparse
import json
import sys
import tempfile
import time
from dataclasses import fields, replace
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sd_server.demo.personalisation import Draw, drift_prompts, generalisation, subject_photos  # noqa: E402
from sd_server.domain.trainings import TrainingSettings  # noqa: E402
from sd_server.engine.lora_training import start_training  # noqa: E402
from sd_server.storage.model_files import TRAINING_DEFAULTS_FILE, training_defaults  # noqa: E402

PROJECT_DIR = Path(__file__).resolve().parent.parent
MODEL = "demo"


def drawer(pipeline: StableDiffusionPipeline, size: int) -> Draw:
    """(prompt, seed) pairs -> 20-step pictures of ``size`` pixels a side, one pipeline call each."""

    def draw(text: str, seed: int) -> Image.Image:
        generator = torch.Generator("cpu").manual_seed(seed)
        return pipeline(text, num_inference_steps=20, width=size, height=size, generator=generator).images[0]

    return lambda requests: [draw(text, seed) for text, seed in requests]


def settings_from(arguments: argparse.Namespace) -> TrainingSettings:
    """The demo model's training defaults, with the options given on the command line over them."""
    defaults = training_defaults(PROJECT_DIR / "models", MODEL)
    given = {field.name: getattr(arguments, field.name) for field in fields(TrainingSettings) if getattr(arguments, field.name, None) is not None}
    return replace(TrainingSettings(), **{**defaults, **given}, defaults_from=f"{MODEL}/{TRAINING_DEFAULTS_FILE}")


def train(settings: TrainingSettings, photos: int, work: Path) -> tuple[Path, float]:
    """Train the LoRA from ``photos`` subject photos; its file and the seconds from photos to exported LoRA."""
    folder = work / "photos"
    folder.mkdir()
    paths = []
    for index, image in enumerate(subject_photos(photos, size=settings.resolution)):
        paths.append(folder / f"{index:02d}.png")
        image.save(paths[-1])
    started = time.perf_counter()
    trainer = start_training(PROJECT_DIR / "models", MODEL, paths, settings, "cpu", class_images_dir=work / "class-images")
    while not trainer.prepare():  # the class pictures, a few at a time
        pass
    trainer.run(settings.steps)
    lora = work / "subject.safetensors"
    trainer.export(lora)
    return lora, time.perf_counter() - started


def main() -> None:
    """Train, measure, print the figures (and write them as JSON when asked)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, kind in (("steps", int), ("rank", int), ("learning_rate", float), ("batch_size", int), ("resolution", int),
                       ("prior_loss_weight", float), ("class_images", int), ("seed", int), ("class_word", str)):  # fmt: skip
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, dest=name)
    parser.add_argument("--caption", help="caption template, with {trigger}")
    parser.add_argument("--photos", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=10, help="pictures per new context")
    parser.add_argument("--drift-prompts", type=int, default=40)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    arguments = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    settings = settings_from(arguments)
    with tempfile.TemporaryDirectory() as scratch:
        lora, seconds = train(settings, arguments.photos, Path(scratch))
        base = StableDiffusionPipeline.from_pretrained(PROJECT_DIR / "models" / MODEL, safety_checker=None, requires_safety_checker=False, dtype=torch.float32)
        base.set_progress_bar_config(disable=True)
        trained = StableDiffusionPipeline.from_pretrained(PROJECT_DIR / "models" / MODEL, safety_checker=None, requires_safety_checker=False, dtype=torch.float32)
        trained.set_progress_bar_config(disable=True)
        trained.load_lora_weights(lora.parent, weight_name=lora.name)
        size = settings.resolution
        result = generalisation(drawer(base, size), drawer(trained, size), settings.trigger, settings.class_word, range(arguments.seeds), drift_prompts(arguments.drift_prompts))
    figures = {
        "benchmark": "training_quality",
        "model": MODEL,
        "photos": arguments.photos,
        "settings": {field.name: getattr(settings, field.name) for field in fields(TrainingSettings)},
        "training_s": round(seconds, 1),
        "seeds_per_context": arguments.seeds,
        "drift_prompts": arguments.drift_prompts,
        **result.as_dict(),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(figures, indent=2))
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
