"""The demo model: a tiny Stable Diffusion 1.5-shaped pipeline trained here on a world of drawn shapes (``world``,
``vocabulary``, ``architecture``, ``training``, ``evaluation``), and random tiny pipelines and LoRAs for tests
where the pixels do not matter (``random_pipeline``)."""
