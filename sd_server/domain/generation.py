"""What to generate: the validated fields of a request, and the samplers a request may pick."""

import json
from dataclasses import asdict, dataclass
from enum import Enum

MAX_SEED = 2**32 - 1


class SchedulerName(str, Enum):
    """The samplers a request may pick; left out, the model's own scheduler runs."""

    pndm = "pndm"
    ddim = "ddim"
    euler = "euler"
    euler_a = "euler_a"
    heun = "heun"
    dpmpp_2m = "dpmpp_2m"
    dpmpp_2m_karras = "dpmpp_2m_karras"
    unipc = "unipc"


# AUTOMATIC1111's names, written into each PNG's parameters chunk.
A1111_SAMPLERS = {
    SchedulerName.pndm: "PNDM",
    SchedulerName.ddim: "DDIM",
    SchedulerName.euler: "Euler",
    SchedulerName.euler_a: "Euler a",
    SchedulerName.heun: "Heun",
    SchedulerName.dpmpp_2m: "DPM++ 2M",
    SchedulerName.dpmpp_2m_karras: "DPM++ 2M Karras",
    SchedulerName.unipc: "UniPC",
}


def sampler_label(name: str) -> str:
    """A1111's sampler name for an API scheduler name (a model's own scheduler outside the set keeps its name)."""
    try:
        return A1111_SAMPLERS[SchedulerName(name)]
    except ValueError:
        return name


@dataclass(frozen=True)
class Generation:
    """A generation as validated at the edge: prompts, whose model, and the sampling settings."""

    prompt: str
    negative_prompt: str | None
    user_id: str
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int
    seed: int | None
    num_images: int
    scheduler: SchedulerName | None

    @property
    def work(self) -> int:
        """width x height x steps x images: what SD_MAX_PIXEL_STEPS caps."""
        return self.width * self.height * self.num_inference_steps * self.num_images

    def canonical_json(self) -> str:
        """The fields as compact JSON, in declaration order (what an idempotency fingerprint hashes)."""
        fields = {name: value.value if isinstance(value, Enum) else value for name, value in asdict(self).items()}
        return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
