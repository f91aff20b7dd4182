"""Entry point: the application (``uvicorn main:app``), served on SD_HOST:SD_PORT by ``python main.py``."""

import uvicorn

from config import Settings
from sd_server.app import create_app

app = create_app()

if __name__ == "__main__":
    settings = Settings()
    # A request that still waits when shutdown begins gets SD_SHUTDOWN_TIMEOUT_S, so the process always ends.
    uvicorn.run("main:app", host=settings.host, port=settings.port, timeout_graceful_shutdown=int(settings.shutdown_timeout_s))
