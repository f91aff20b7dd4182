"""The unit tier: single parts (the lifecycle, the scheduler, the trainings, parsers, stores) called directly, on
the fake engine; no app, no worker threads, no torch."""

from fake_fixtures import engine, models_dir  # noqa: F401  (fixtures)
