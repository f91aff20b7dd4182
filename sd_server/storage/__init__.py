"""Files: generated images (a local folder or S3) and model files under SD_MODELS_DIR."""
