"""The HTTP models, one module per feature (the top-level ``schemas.py`` re-exports them)."""
