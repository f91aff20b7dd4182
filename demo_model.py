"""The demo model's command line: train it, export it, evaluate it, or build a random tiny pipeline.

    python demo_model.py train [--output models/demo] [--steps N ...]   train from scratch (resumable), then export
    python demo_model.py export [--output DIR]                          export the last saved training state
    python demo_model.py evaluate [--model models/demo] [--count 72]    accuracy per attribute, seen and held-out pairs
    python demo_model.py lora [--source red --target purple]            a LoRA that draws one colour as another
    python demo_model.py random OUTPUT_DIR                              a random tiny pipeline (draws noise)
"""

import argparse
from dataclasses import fields
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent
DEMO_MODEL_DIR = PROJECT_DIR / "models" / "demo"
WORK_DIR = PROJECT_DIR / "models" / ".demo-training"


def parser() -> argparse.ArgumentParser:
    """The command line's grammar: one subcommand each, the training plan's fields as options."""
    from sd_server.demo.training import TrainingPlan

    command_line = argparse.ArgumentParser(description="the demo model: train, export, evaluate, or build a random one")
    commands = command_line.add_subparsers(dest="command", required=True)
    for name in ("train", "export"):
        command = commands.add_parser(name)
        command.add_argument("--output", type=Path, default=DEMO_MODEL_DIR)
        command.add_argument("--work", type=Path, default=WORK_DIR, help="where the resumable training state is kept")
        for plan_field in fields(TrainingPlan):
            option = f"--{plan_field.name.replace('_', '-')}"
            command.add_argument(option, type=type(plan_field.default), default=plan_field.default)
    evaluate = commands.add_parser("evaluate")
    evaluate.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    evaluate.add_argument("--count", type=int, default=72, help="prompts to render (they cycle through every scene)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--steps", type=int, default=20)
    evaluate.add_argument("--guidance-scale", type=float, default=7.5)
    evaluate.add_argument("--grid", type=Path, help="also save the pictures side by side to this PNG")
    lora = commands.add_parser("lora")
    lora.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    lora.add_argument("--output", type=Path, default=PROJECT_DIR / "models" / "demo-loras" / "red-to-purple.safetensors")
    lora.add_argument("--source", default="red")
    lora.add_argument("--target", default="purple")
    lora.add_argument("--steps", type=int, default=400)
    random = commands.add_parser("random")
    random.add_argument("output", type=Path)
    return command_line


def main() -> None:
    """Run the subcommand the command line names."""
    arguments = parser().parse_args()
    if arguments.command == "random":
        from sd_server.demo.random_pipeline import save_random_pipeline

        print(f"random tiny pipeline written to {save_random_pipeline(arguments.output)}")
    elif arguments.command == "evaluate":
        evaluate(arguments)
    elif arguments.command == "lora":
        from sd_server.demo.lora import RecolourPlan, save_recolour_lora

        plan = RecolourPlan(source=arguments.source, target=arguments.target, steps=arguments.steps)
        print(f"LoRA written to {save_recolour_lora(arguments.model, arguments.output, plan)}")
    else:
        from sd_server.demo import training

        plan = training.TrainingPlan(**{field.name: getattr(arguments, field.name) for field in fields(training.TrainingPlan)})
        if arguments.command == "train":
            print(f"trained demo model written to {training.train(plan, arguments.output, arguments.work)}")
        else:
            print(f"demo model at its last saved step written to {training.export(training.resume(plan, arguments.work), arguments.output)}")


def evaluate(arguments: argparse.Namespace) -> None:
    """Render, read back and score; print the table, save the grid when asked, and exit 1 when a target is missed."""
    import torch
    from diffusers import StableDiffusionPipeline

    from sd_server.demo.evaluation import evaluate as score_model
    from sd_server.demo.evaluation import grid

    pipeline = StableDiffusionPipeline.from_pretrained(str(arguments.model), dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    score, pictures = score_model(pipeline, arguments.count, arguments.seed, arguments.steps, guidance_scale=arguments.guidance_scale)
    print(score.report())
    if arguments.grid:
        grid(pictures).save(arguments.grid)
        print(f"grid written to {arguments.grid}")
    print("every target met" if score.meets_targets() else "targets missed")
    raise SystemExit(0 if score.meets_targets() else 1)


if __name__ == "__main__":
    main()
