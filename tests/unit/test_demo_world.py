"""The demo model's world and its evaluator: drawn ground truth reads back right, every time."""

import io
import random

import pytest

from sd_server.demo.world import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT,
    SHAPES,
    Scene,
    draw,
    possible,
    prompt,
    prompted_scene,
    random_scene,
    read,
)


@pytest.mark.parametrize("anywhere", [True, False], ids=["shapes-anywhere", "centred-as-prompted"])
def test_the_evaluator_reads_drawn_scenes_back_exactly(anywhere):
    rng = random.Random(7)
    scenes = [random_scene(rng, include_held_out=True) if anywhere else prompted_scene(rng) for _ in range(120)]

    readings = [read(draw(scene, rng)) for scene in scenes]

    for scene, reading in zip(scenes, readings):
        assert (reading.colour, reading.shape, reading.background) == (scene.colour, scene.shape, scene.background), scene


def test_an_empty_picture_reads_as_background_without_a_shape():
    from PIL import Image

    reading = read(Image.new("RGB", (256, 256), BACKGROUNDS["gray"]))

    assert reading.background == "gray" and reading.shape is None and reading.colour is None


def test_held_out_pairs_are_never_drawn_for_training_and_shapes_stand_out_from_their_background():
    rng = random.Random(1)
    scenes = [random_scene(rng) for _ in range(2000)] + [prompted_scene(rng) for _ in range(2000)]

    assert not any(scene.held_out for scene in scenes)
    assert all(possible(scene.colour, scene.background) for scene in scenes)
    assert {(scene.colour, scene.shape) for scene in scenes} == {(c, s) for c in COLOURS for s in SHAPES} - HELD_OUT


def test_prompts_name_size_colour_shape_and_background_and_can_leave_words_out():
    scene = Scene("circle", "red", "blue", "large", "center")

    assert prompt(scene) == "a large red circle on a blue background"
    assert prompt(scene, with_colour=False, with_background=False) == "a large circle"
    assert prompt(scene, with_shape=False) == "a large red shape on a blue background"


def test_the_score_of_drawn_ground_truth_meets_every_target_and_a_wrong_colour_misses_them():
    from dataclasses import replace

    from sd_server.demo.evaluation import Score
    from sd_server.demo.world import evaluation_scenes

    rng, right, wrong = random.Random(3), Score(), Score()
    for scene in evaluation_scenes(72, seed=0):
        picture = draw(scene, rng)
        right.add(scene, picture)
        wrong.add(replace(scene, colour="green" if scene.colour != "green" else "red"), picture)

    assert right.meets_targets() and right.accuracy("held_out", "all") == 1.0 and right.counts["held_out"] > 0
    assert not wrong.meets_targets() and wrong.accuracy("seen", "colour") == 0.0


def test_a_demo_trainings_samples_are_scored_against_the_subject_its_photos_show(tmp_path):
    from sd_server.demo.personalisation import score_samples, subject_photos
    from sd_server.demo.world import Scene, draw
    from sd_server.domain.trainings import TrainingSettings

    photos = []
    for index, photo in enumerate(subject_photos(4)):
        photos.append(tmp_path / f"{index}.png")
        photo.save(photos[-1])
    settings = TrainingSettings(class_word="shape", sample_templates=("a {trigger} {class_word} on a black background", "a large {trigger} {class_word} on a white background"))
    rng = random.Random(0)
    right = draw(Scene("triangle", "yellow", "black", position="center"), rng)
    wrong = draw(Scene("circle", "red", "white", "large", "center"), rng)
    png = io.BytesIO()
    wrong.save(png, format="PNG")

    scores = score_samples(photos, [right, png.getvalue()], settings)  # a picture, and a PNG as the Ray engine gives

    assert scores["subject"] == "yellow triangle" and scores["subject_shown"] == 0.5
    assert [(row["prompt"], row["shows_subject"]) for row in scores["samples"]] == [
        ("a sks shape on a black background", True), ("a large sks shape on a white background", False)
    ]
    assert scores["samples"][1]["read"] == "red circle on white"
