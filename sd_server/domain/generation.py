"""What to generate: the validated fields of a request (text to image, or from an init image and a mask), and the
samplers a request may pick."""

import json
from dataclasses import asdict, dataclass
from enum import Enum

MAX_SEED = 2**32 - 1
MIN_SIDE, MAX_SIDE = 64, 2048  # an image's width and height, as A1111 allows (SD_MAX_PIXEL_STEPS caps the product)
MAX_GUIDANCE = 30.0  # classifier-free guidance, as high as A1111's slider
MAX_PROMPT_CHARS = 2000  # a prompt or negative prompt, as sent and after its styles are applied


class SchedulerName(str, Enum):
    """The samplers a request may pick; left out, the model's own scheduler runs. ``_karras``: the same sampler on
    Karras' noise schedule."""

    pndm = "pndm"
    ddim = "ddim"
    ddpm = "ddpm"
    euler = "euler"
    euler_karras = "euler_karras"
    euler_a = "euler_a"
    heun = "heun"
    heun_karras = "heun_karras"
    dpmpp_2m = "dpmpp_2m"
    dpmpp_2m_karras = "dpmpp_2m_karras"
    dpmpp_2m_sde = "dpmpp_2m_sde"
    dpmpp_2m_sde_karras = "dpmpp_2m_sde_karras"
    dpmpp_sde = "dpmpp_sde"
    dpmpp_sde_karras = "dpmpp_sde_karras"
    dpm2 = "dpm2"
    dpm2_karras = "dpm2_karras"
    dpm2_a = "dpm2_a"
    dpm2_a_karras = "dpm2_a_karras"
    unipc = "unipc"
    unipc_karras = "unipc_karras"


KARRAS_SUFFIX = "_karras"
# AUTOMATIC1111's names, written into each PNG's parameters chunk (a Karras variant: the name and " Karras").
A1111_BASE_SAMPLERS = {
    SchedulerName.pndm: "PNDM",
    SchedulerName.ddim: "DDIM",
    SchedulerName.ddpm: "DDPM",
    SchedulerName.euler: "Euler",
    SchedulerName.euler_a: "Euler a",
    SchedulerName.heun: "Heun",
    SchedulerName.dpmpp_2m: "DPM++ 2M",
    SchedulerName.dpmpp_2m_sde: "DPM++ 2M SDE",
    SchedulerName.dpmpp_sde: "DPM++ SDE",
    SchedulerName.dpm2: "DPM2",
    SchedulerName.dpm2_a: "DPM2 a",
    SchedulerName.unipc: "UniPC",
}


def plain_sampler(scheduler: SchedulerName) -> SchedulerName:
    """The sampler without Karras' noise schedule (itself if it has none)."""
    return SchedulerName(scheduler.value.removesuffix(KARRAS_SUFFIX))


A1111_SAMPLERS = {scheduler: A1111_BASE_SAMPLERS.get(scheduler) or A1111_BASE_SAMPLERS[plain_sampler(scheduler)] + " Karras" for scheduler in SchedulerName}


def karras_variant(scheduler: SchedulerName) -> SchedulerName | None:
    """The sampler on Karras' noise schedule (itself if it is one); None when there is no such variant."""
    name = scheduler.value.removesuffix(KARRAS_SUFFIX) + KARRAS_SUFFIX
    return SchedulerName(name) if name in SchedulerName._value2member_map_ else None


def sampler_label(name: str) -> str:
    """A1111's sampler name for an API scheduler name (a model's own scheduler outside the set keeps its name)."""
    try:
        return A1111_SAMPLERS[SchedulerName(name)]
    except ValueError:
        return name


class Mode(str, Enum):
    """What a generation starts from: noise (txt2img), an init image (img2img), or an init image and a mask of what
    to repaint (inpaint)."""

    txt2img = "txt2img"
    img2img = "img2img"
    inpaint = "inpaint"


@dataclass(frozen=True)
class ImageInput:
    """What img2img and inpainting start from: the init image and mask (PNGs at the output size, named by their
    SHA-256), how far to move from the image, and how the mask applies."""

    init_image_sha256: str
    strength: float
    mask_sha256: str | None = None
    mask_blur: int = 4
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 32
    init_credentials: bool = False  # the init image came with C2PA credentials: kept as uploaded, an ingredient

    @property
    def mode(self) -> Mode:
        """inpaint with a mask, else img2img."""
        return Mode.inpaint if self.mask_sha256 else Mode.img2img


# Hires fix's upscalers, by A1111's names: latent ones resize the first pass's latents, pixel ones its picture.
LATENT_UPSCALERS = ("Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent (nearest)", "Latent (nearest-exact)")  # fmt: skip
PIXEL_UPSCALERS = ("Lanczos", "Nearest")
HIRES_UPSCALERS = LATENT_UPSCALERS + PIXEL_UPSCALERS
DEFAULT_HIRES_STRENGTH = 0.7  # A1111's


@dataclass(frozen=True)
class Hires:
    """Hires fix: the first pass upscaled to width x height by ``upscaler``, then refined by an img2img pass of
    ``steps`` (0: the first pass's) at ``strength``, as A1111's enable_hr does."""

    width: int
    height: int
    upscaler: str = "Latent"
    steps: int = 0
    strength: float = DEFAULT_HIRES_STRENGTH

    def steps_to_run(self, first_pass_steps: int) -> int:
        """Denoising steps the second pass runs: the first (1 - strength) of its steps are skipped, as in img2img."""
        steps = self.steps or first_pass_steps
        return min(int(steps * self.strength), steps)


def hires_size(width: int, height: int, scale: float, resize_x: int = 0, resize_y: int = 0) -> tuple[int, int]:
    """Hires fix's size, as A1111 reckons it: the first pass's times ``scale``, or ``resize_x`` x ``resize_y`` (one of
    them 0: the other side follows the aspect), rounded to multiples of 8; ValueError outside MIN_SIDE..MAX_SIDE."""
    size: tuple[float, float]
    if resize_x and resize_y:
        size = (resize_x, resize_y)
    elif resize_x or resize_y:
        size = (resize_x, resize_x * height / width) if resize_x else (resize_y * width / height, resize_y)
    else:
        size = (width * scale, height * scale)
    target = (round(size[0] / 8) * 8, round(size[1] / 8) * 8)
    if not all(MIN_SIDE <= side <= MAX_SIDE for side in target):
        raise ValueError(f"hires fix's size {target[0]}x{target[1]} is outside {MIN_SIDE}..{MAX_SIDE} a side; lower the scale")
    return target


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
    image_input: ImageInput | None = None
    styles: tuple[str, ...] = ()  # applied already: the prompts are the effective ones
    hires: Hires | None = None

    @property
    def mode(self) -> Mode:
        """txt2img, img2img or inpaint."""
        return self.image_input.mode if self.image_input else Mode.txt2img

    @property
    def strength(self) -> float:
        """How far from the init image the picture may move: 1 ignores it (and txt2img has none)."""
        return self.image_input.strength if self.image_input else 1.0

    @property
    def steps_to_run(self) -> int:
        """Denoising steps that really run: img2img and inpainting skip the first (1 - strength) of them."""
        return min(int(self.num_inference_steps * self.strength), self.num_inference_steps)

    @property
    def total_steps(self) -> int:
        """Denoising steps that really run, hires fix's second pass included."""
        return self.steps_to_run + (self.hires.steps_to_run(self.num_inference_steps) if self.hires else 0)

    @property
    def work(self) -> int:
        """width x height x steps x images, hires fix's pass at its size added: what SD_MAX_PIXEL_STEPS caps."""
        first = self.width * self.height * self.num_inference_steps
        second = self.hires.width * self.hires.height * (self.hires.steps or self.num_inference_steps) if self.hires else 0
        return (first + second) * self.num_images

    @property
    def cost(self) -> int:
        """Pixel-steps that really run: width x height x steps that run x images, hires fix's pass at its size added."""
        second = self.hires.width * self.hires.height * self.hires.steps_to_run(self.num_inference_steps) if self.hires else 0
        return (self.width * self.height * self.steps_to_run + second) * self.num_images

    def canonical_json(self) -> str:
        """The fields as compact JSON, in declaration order (what an idempotency fingerprint hashes)."""
        fields = {name: value.value if isinstance(value, Enum) else value for name, value in asdict(self).items()}
        if self.image_input is None and not self.styles:  # a text-to-image request keeps the fingerprint it always had
            del fields["image_input"], fields["styles"]
        if self.hires is None:
            del fields["hires"]
        return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
