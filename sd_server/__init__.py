"""A personalized Stable Diffusion server: per-user models behind an HTTP API, one worker that owns the device.

Layers, each importing only those below it (checked by import-linter, see `pyproject.toml`):
``app`` (composition root) → ``api`` (routes) → ``jobs`` (queue and workers) → ``engine`` (pipelines) and
``registry`` (who runs which model) → ``security``, ``persistence``, ``storage`` → ``observability`` →
``domain`` and ``errors``.
"""

VERSION = "0.6.0"
