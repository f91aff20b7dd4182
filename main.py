"""Entry point: the application (``uvicorn main:app``), served on SD_HOST:SD_PORT by ``python main.py``."""

import uvicorn

from config import Settings
from sd_server.app import create_app

app = create_app()

if __name__ == "__main__":
    settings = Settings()
    uvicorn.run("main:app", host=settings.host, port=settings.port)
