"""The engine: what turns a batch of prompts into images. ``interface`` is what the job queue may ask of one (and
imports no torch); ``diffusers_engine`` runs Stable Diffusion pipelines in this process; ``ray_engine`` runs them on
Ray Serve replicas (``ray_replica``), each a diffusers engine of its own (SD_ENGINE=ray, an optional extra)."""
