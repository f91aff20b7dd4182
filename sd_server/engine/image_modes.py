"""img2img and inpainting on a cached checkpoint: each mode's pipeline made from the cached one with ``from_pipe``
(the same modules: no reload, no extra weights), each image's inputs, and inpainting's crop and overlay.
Inpainting checkpoints (a 9-channel UNet) run every mode on their own inpainting pipeline; ordinary ones inpaint on
the masked-latent path."""

import io
from dataclasses import dataclass
from typing import Any

from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageFilter

from sd_server.domain.generation import Mode
from sd_server.engine.cache import CachedCheckpoint
from sd_server.engine.interface import BatchKey, ImageSource

INPAINTING_UNET_CHANNELS = 9  # latents, mask and masked-image latents
OVERLAY = VaeImageProcessor()  # its apply_overlay and get_crop_region need no configuration


@dataclass
class PreparedImage:
    """One image's pipeline inputs, and what puts the result back: the picture and mask to overlay the generated
    pixels on, and the crop they came from (inpainting at full resolution)."""

    image: Image.Image
    mask: Image.Image | None = None
    original: Image.Image | None = None
    overlay_mask: Image.Image | None = None
    crop: tuple[int, int, int, int] | None = None

    def finish(self, generated: Image.Image) -> Image.Image:
        """The generated picture pasted into its crop and laid under the kept pixels (inpainting); else itself."""
        if self.overlay_mask is None or self.original is None:
            return generated
        return OVERLAY.apply_overlay(self.overlay_mask, self.original, generated, self.crop)


def is_inpainting_model(checkpoint: CachedCheckpoint) -> bool:
    """True for an inpainting checkpoint (its UNet also takes the mask and the masked image)."""
    return checkpoint.pipeline.unet.config.in_channels == INPAINTING_UNET_CHANNELS


def mode_pipeline(checkpoint: CachedCheckpoint, mode: Mode) -> Any:
    """The pipeline that runs ``mode`` on ``checkpoint``: the cached one for txt2img, else one made from it once
    with ``from_pipe`` and kept beside it (call with the checkpoint's lock held)."""
    if is_inpainting_model(checkpoint):
        pipeline_class = StableDiffusionInpaintPipeline
    elif mode is Mode.txt2img:
        return checkpoint.pipeline
    else:
        pipeline_class = StableDiffusionImg2ImgPipeline if mode is Mode.img2img else StableDiffusionInpaintPipeline
    pipeline = checkpoint.derived.get(pipeline_class.__name__)
    if pipeline is None:
        # from_pipe casts the shared modules to its dtype (float32 unless told): keep the cached one's.
        pipeline = pipeline_class.from_pipe(checkpoint.pipeline, dtype=checkpoint.pipeline.dtype)
        pipeline.set_progress_bar_config(disable=True)
        checkpoint.derived[pipeline_class.__name__] = pipeline
    return pipeline


def image_arguments(checkpoint: CachedCheckpoint, key: BatchKey, sources: list[ImageSource | None]) -> tuple[dict, list[PreparedImage | None]]:
    """The pipeline's image arguments for a batch with one source per image (None in txt2img), and each image's
    preparation (for ``finish``)."""
    size = {"width": key.width, "height": key.height}
    inpainting_model = is_inpainting_model(checkpoint)
    if key.mode is Mode.txt2img and not inpainting_model:
        return size, [None] * len(sources)
    preparation = prepare_for_inpainting_model if inpainting_model else prepare
    prepared: list[PreparedImage | None] = [preparation(source, key.width, key.height) for source in sources]
    arguments: dict[str, Any] = {"image": [item.image for item in prepared], "strength": key.strength}
    if key.mode is Mode.img2img and not inpainting_model:
        return arguments, prepared  # img2img takes its size from the images
    return {**arguments, **size, "mask_image": [item.mask for item in prepared]}, prepared


def prepare(source: ImageSource, width: int, height: int) -> PreparedImage:
    """An image's inputs: the init image (img2img), or the init image and its blurred mask, cropped around the mask
    and scaled up to the output size when ``full_res``."""
    init = decode(source.init_png, "RGB")
    if source.mask_png is None:
        return PreparedImage(init)
    mask = decode(source.mask_png, "L")
    if source.mask_blur:
        mask = mask.filter(ImageFilter.GaussianBlur(source.mask_blur))
    if not source.full_res:
        return PreparedImage(init, mask, init, mask)
    crop = OVERLAY.get_crop_region(mask, width, height, pad=source.full_res_padding)
    scaled = lambda image: image.crop(crop).resize((width, height), Image.Resampling.LANCZOS)  # noqa: E731
    return PreparedImage(scaled(init), scaled(mask), init, mask, crop)


def prepare_for_inpainting_model(source: ImageSource | None, width: int, height: int) -> PreparedImage:
    """An inpainting checkpoint's inputs in every mode: txt2img paints a blank picture whole, img2img repaints the
    whole init image, inpainting as usual."""
    if source is not None and source.mask_png is not None:
        return prepare(source, width, height)
    image = decode(source.init_png, "RGB") if source else Image.new("RGB", (width, height))
    return PreparedImage(image, Image.new("L", (width, height), 255))


def decode(png: bytes, mode: str) -> Image.Image:
    """A PNG's pixels in ``mode`` (RGB, or L for a mask)."""
    with Image.open(io.BytesIO(png)) as image:
        return image.convert(mode)
