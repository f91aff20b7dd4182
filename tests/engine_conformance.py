"""Checked by mypy (pyproject.toml): every engine, and the tests' fake, implements the Engine protocol, and every
training run the TrainingRun protocol. A method that drifts from the protocol fails the type check in CI."""

from fakes import FakeEngine, FakeTrainingRun
from sd_server.engine.diffusers_engine import DiffusersEngine
from sd_server.engine.interface import Engine, TrainingRun
from sd_server.engine.lora_training import LoraTrainer
from sd_server.engine.ray_engine import RayEngine
from sd_server.engine.ray_training import RemoteTraining

ENGINES: list[type[Engine]] = [DiffusersEngine, RayEngine, FakeEngine]
TRAINING_RUNS: list[type[TrainingRun]] = [LoraTrainer, RemoteTraining, FakeTrainingRun]
