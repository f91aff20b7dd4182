"""The ModelService: loads, caches and runs the Stable Diffusion pipelines of every user's model.

It is the in-process diffusers engine, ``sd_server.engine.diffusers_engine.DiffusersEngine``: a two-tier byte-budgeted
checkpoint cache (``engine/cache.py``), LoRA adapters on shared bases (``engine/adapters.py``), and batches run on the
device (``engine/diffusers_engine.py``). The job queue reaches it through ``sd_server.engine.interface.Engine``.
"""

from sd_server.engine.diffusers_engine import DiffusersEngine as ModelService

__all__ = ["ModelService"]
