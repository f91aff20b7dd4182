"""A minimal Stable Diffusion server, the naive way, for bench_serving.py to compare against.

One shared pipeline; each request gets ``from_pipe`` with a fresh scheduler and runs in the event loop's default
executor; the PNG comes back in the response. No queue, no batching, no persistence. Serves POST /generate/image
(prompt, seed, num_inference_steps, width, height) and GET /health.

    .venv/bin/python benchmarks/baseline_server.py --model models/demo --port 8001
"""

import argparse
import asyncio
import io

import torch
import uvicorn
from diffusers import StableDiffusionPipeline
from fastapi import FastAPI, Response
from pydantic import BaseModel


class Request(BaseModel):
    """The fields the benchmark sends."""

    prompt: str
    seed: int = 0
    num_inference_steps: int = 20
    width: int = 512
    height: int = 512


def create_app(model: str) -> FastAPI:
    """The app, serving ``model``."""
    shared = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    shared.set_progress_bar_config(disable=True)
    app = FastAPI()

    def generate(request: Request) -> bytes:
        pipeline = StableDiffusionPipeline.from_pipe(shared, scheduler=shared.scheduler.from_config(shared.scheduler.config))
        image = pipeline(
            request.prompt,
            num_inference_steps=request.num_inference_steps,
            width=request.width,
            height=request.height,
            generator=torch.Generator("cpu").manual_seed(request.seed),
        ).images[0]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    @app.post("/generate/image")
    async def generate_image(request: Request) -> Response:
        png = await asyncio.get_running_loop().run_in_executor(None, generate, request)
        return Response(png, media_type="image/png")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    return app


def main() -> None:
    """Parse arguments and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    arguments = parser.parse_args()
    uvicorn.run(create_app(arguments.model), host=arguments.host, port=arguments.port, log_level="warning")


if __name__ == "__main__":
    main()
