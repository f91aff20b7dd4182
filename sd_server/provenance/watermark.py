"""An invisible watermark that survives what sharing does to a picture. A spread-spectrum code on a 64x64 grid
stretched over the whole image, so a resized copy (or a JPEG of it) lines up again once it is stretched back to the
grid. Each of the code's 80 bits (a 56-bit payload and a CRC-24) is spread over 51 or 52 cells scattered across the
picture with pseudo-random signs; the reader takes the picture's own slow changes out of each cell, sums each bit's
cells with their signs, and trusts the bits only when the CRC holds.

The embedder knows the picture, so it measures each bit as the reader will and raises the bits the picture's own
texture drowns (improved spread spectrum), more where texture hides the mark. The mark goes into the blue-difference
chroma (Cb), where photographs have little texture and the eye little acuity; a picture whose colours leave no room
there (saturated blues and yellows, as the demo model draws) gets it in the luminance instead. The reader tries both."""

import io
import zlib
from dataclasses import dataclass
from functools import cache

import cv2
import numpy as np
from PIL import Image

GRID = 64  # cells a side; a cell is 4 pixels of a 256-pixel picture, 8 of a 512-pixel one
WORKING_SIDE = 256  # the reader stretches every picture to this side before it reads the grid
SERVICE_BITS, FINGERPRINT_BITS, CHECK_BITS = 16, 40, 24
PAYLOAD_BITS = SERVICE_BITS + FINGERPRINT_BITS
CODE_BITS = PAYLOAD_BITS + CHECK_BITS
LAYOUT_SEED = 0x5D_A7E5  # fixed, not secret: every copy of the service must read every other copy's marks
OUTLIER_SPREAD = 3.0  # cells further than this many median deviations from their neighbours are edges, not mark
EMBED_ROUNDS, BOOST_STEP, MAX_BOOST = 5, 1.6, 4.0  # the embedder's rounds, and how far it may raise a drowned bit
MIN_MASKING, MAX_MASKING = 1.0, 2.0  # a flat area gets ``strength``; a busy one, up to twice as much
TARGET_LEVEL = 1.5  # each bit's mean cell detail (levels of 255) the embedder aims for: JPEG and resizing take some
SEARCH_STEP = 2  # working pixels between the placements a crop search tries (a cell is 4)
SEARCH_MIN_CONFIDENCE = 2.0  # a crop search's find must also stand out: chance CRC passes read about 0.8
KEPT_SIDES = (0.95, 0.9, 0.85, 0.8)
CROPS = [(kept, kept) for kept in KEPT_SIDES] + [(kept, 1.0) for kept in KEPT_SIDES] + [(1.0, kept) for kept in KEPT_SIDES]


@dataclass(frozen=True)
class Channel:
    """A channel the mark can live in: how the reader computes it from RGB, and the RGB change that moves it by one
    level while leaving the other channel as it was (Y and Cb are independent: each one's direction is the other's null)."""

    name: str
    read_weights: np.ndarray
    direction: np.ndarray

    def of(self, rgb: np.ndarray) -> np.ndarray:
        """This channel of an RGB array, as float32."""
        plane: np.ndarray = rgb.astype(np.float32) @ self.read_weights
        return plane


CHROMA = Channel("Cb", np.array([-0.168736, -0.331264, 0.5], np.float32), np.array([0.0, -0.344136, 1.772], np.float32))
LUMA = Channel("Y", np.array([0.299, 0.587, 0.114], np.float32), np.array([1.0, 1.0, 1.0], np.float32))
CHANNELS = (CHROMA, LUMA)  # the embedder's preference, and the reader's order


@dataclass(frozen=True)
class WatermarkPayload:
    """What the mark carries: the service that made the picture, and the picture's fingerprint (10 hex digits: the
    first 40 bits of the SHA-256 of its generation parameters, so the same request and seed make the same pixels)."""

    service_id: int
    fingerprint: str

    def code(self) -> np.ndarray:
        """The 80 bits written into the picture: the payload, then its CRC-24."""
        value = (self.service_id % (1 << SERVICE_BITS)) << FINGERPRINT_BITS | int(self.fingerprint, 16) % (1 << FINGERPRINT_BITS)
        payload = value.to_bytes(PAYLOAD_BITS // 8, "big")
        return np.unpackbits(np.frombuffer(payload + crc24(payload), dtype=np.uint8))

    @classmethod
    def from_code(cls, bits: np.ndarray) -> "WatermarkPayload | None":
        """The payload those 80 bits spell, or None when their CRC does not hold (no mark, or one too damaged)."""
        data = np.packbits(bits.astype(np.uint8)).tobytes()
        payload, check = data[: PAYLOAD_BITS // 8], data[PAYLOAD_BITS // 8 :]
        if crc24(payload) != check:
            return None
        value = int.from_bytes(payload, "big")
        return cls(service_id=value >> FINGERPRINT_BITS, fingerprint=f"{value % (1 << FINGERPRINT_BITS):010x}")


@dataclass(frozen=True)
class WatermarkReading:
    """What the reader found: the payload (None: no mark it could read), how clearly its bits stood out (the mean
    distance of each bit's sum from zero in units of its noise: unmarked pictures read about 0.8), and the channel."""

    payload: WatermarkPayload | None
    confidence: float
    channel: str | None = None


def crc24(data: bytes) -> bytes:
    """The check of ``data``: the low 24 bits of its CRC-32, as three bytes (a random reading passes once in 16.7
    million; the crop search's 2,910 tries also ask for SEARCH_MIN_CONFIDENCE)."""
    return (zlib.crc32(data) & 0xFFFFFF).to_bytes(3, "big")


@cache
def layout() -> tuple[np.ndarray, np.ndarray]:
    """Each cell's sign (+1 or -1) and the code bit it carries, the bits spread evenly and at random over the grid."""
    rng = np.random.default_rng(LAYOUT_SEED)
    signs = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(GRID, GRID))
    bit_of_cell = rng.permutation(np.arange(GRID * GRID) % CODE_BITS).reshape(GRID, GRID)
    return signs, bit_of_cell


def embed(image: Image.Image, payload: WatermarkPayload, strength: float, region: Image.Image | None = None) -> Image.Image:
    """``image`` with the mark of ``payload``: in its chroma when every bit reads clearly there within the limits,
    also after a halving and a JPEG; else in its luminance, unless the chroma read clearly and the luminance does
    not (a small picture with much texture). With ``region`` (grayscale, the image's size) only its white pixels
    change, in proportion (an inpainting's mask: what the user's picture kept stays exactly as it was)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    weights = np.asarray(region.convert("L"), dtype=np.float32) / 255 if region is not None else np.ones(pixels.shape[:2], np.float32)
    chroma, chroma_clear = embed_in(CHROMA, pixels, payload, strength, weights)
    if chroma_clear and survives_sharing(chroma, payload):
        return Image.fromarray(chroma)
    luma, luma_clear = embed_in(LUMA, pixels, payload, strength, weights)
    return Image.fromarray(chroma if chroma_clear and not luma_clear else luma)


def survives_sharing(marked: np.ndarray, payload: WatermarkPayload) -> bool:
    """Whether the chroma mark still reads after what sharing does at its harshest here: halved, then a JPEG at
    quality 75 (which halves the chroma again and coarsens it)."""
    image = Image.fromarray(marked)
    buffer = io.BytesIO()
    image.resize((image.width // 2, image.height // 2), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=75)
    plane = CHROMA.of(np.asarray(Image.open(buffer).convert("RGB")))
    return read_placed(stretched(plane, (WORKING_SIDE, WORKING_SIDE)), 0, 0, CHROMA).payload == payload


def embed_in(channel: Channel, pixels: np.ndarray, payload: WatermarkPayload, strength: float, weights: np.ndarray) -> tuple[np.ndarray, bool]:
    """The pixels with the mark in ``channel`` (times ``weights``, 0 to 1 a pixel), ``strength`` levels (of 255)
    where that reads clearly, more (up to MAX_BOOST times) for the bits the picture's texture drowns, as the reader
    measures them (on a working-size copy, so a large picture costs no more rounds); and whether every bit reached
    TARGET_LEVEL."""
    signs, bit_of_cell = layout()
    polarity: np.ndarray = payload.code().astype(np.float32) * 2 - 1
    working = stretched(pixels, (WORKING_SIDE, WORKING_SIDE))
    working_weights = stretched(weights, (WORKING_SIDE, WORKING_SIDE))
    masking = texture_masking(channel.of(working))
    amplitudes: np.ndarray = np.full(CODE_BITS, strength, dtype=np.float32)
    for _ in range(EMBED_ROUNDS):
        cells = signs * masking * (amplitudes * polarity)[bit_of_cell]
        pattern = stretched(cells, (WORKING_SIDE, WORKING_SIDE), smooth=True) * working_weights
        marked = np.clip(working + pattern[..., None] * channel.direction, 0, 255)
        sums, _ = bit_sums(*cell_detail(channel.of(np.rint(marked)), 0, 0))
        short = polarity * sums / cells_per_bit() < TARGET_LEVEL
        if not short.any():
            break
        amplitudes = np.where(short, np.minimum(amplitudes * BOOST_STEP, strength * MAX_BOOST), amplitudes)
    pattern = stretched(cells, (pixels.shape[1], pixels.shape[0]), smooth=True) * weights
    return np.clip(np.rint(pixels + pattern[..., None] * channel.direction), 0, 255).astype(np.uint8), not short.any()


def texture_masking(working: np.ndarray) -> np.ndarray:
    """How much stronger than ``strength`` each cell's mark may be: as strong as the picture's own texture there
    (which hides it, and which it must outweigh), from MIN_MASKING times in flat areas to MAX_MASKING in busy ones."""
    detail, _ = cell_detail(working, 0, 0)
    activity = np.sqrt(np.maximum(cv2.blur(detail**2, (3, 3), borderType=cv2.BORDER_REFLECT), 0))
    masking: np.ndarray = np.clip(activity / (float(np.median(activity)) + 1e-3), MIN_MASKING, MAX_MASKING).astype(np.float32)
    return masking


@cache
def cells_per_bit() -> np.ndarray:
    """How many grid cells carry each code bit (51 or 52)."""
    counts: np.ndarray = np.bincount(layout()[1].ravel(), minlength=CODE_BITS).astype(np.float64)
    return counts


def read(image: Image.Image, search_crops: bool = True) -> WatermarkReading:
    """The mark in ``image``, stretched back to the grid whatever its size now, in either channel; when that finds
    none and ``search_crops``, the mark of the crop it may be: up to a fifth off each side, anywhere in the original."""
    pixels = np.asarray(image.convert("RGB"))
    readings = [read_placed(stretched(channel.of(pixels), (WORKING_SIDE, WORKING_SIDE)), 0, 0, channel) for channel in CHANNELS]
    found = [reading for reading in readings if reading.payload is not None]
    if found or not search_crops:
        return max(found or readings, key=lambda reading: reading.confidence)
    for channel in CHANNELS:
        if (cropped := read_crop(channel.of(pixels), channel)) is not None:
            return cropped
    return max(readings, key=lambda reading: reading.confidence)


def read_crop(plane: np.ndarray, channel: Channel) -> WatermarkReading | None:
    """The clearest mark found by placing ``plane`` as each crop of the working picture it may be, or None."""
    best: WatermarkReading | None = None
    for kept_x, kept_y in CROPS:
        size = (round(kept_x * WORKING_SIDE), round(kept_y * WORKING_SIDE))
        shrunk = stretched(plane, size)
        for left in range(0, WORKING_SIDE - size[0] + 1, SEARCH_STEP):
            for top in range(0, WORKING_SIDE - size[1] + 1, SEARCH_STEP):
                candidate = read_placed(shrunk, left, top, channel)
                clear = candidate.payload is not None and candidate.confidence >= SEARCH_MIN_CONFIDENCE
                if clear and (best is None or candidate.confidence > best.confidence):
                    best = candidate
    return best


def stretched(plane: np.ndarray, size: tuple[int, int], smooth: bool = False) -> np.ndarray:
    """A channel (or an RGB array) resized to ``size`` (width, height): by area when shrinking, linearly when growing;
    ``smooth``: linearly both ways (the grid of cells drawn as the mark's pattern)."""
    shrinking = size[0] <= plane.shape[1] and not smooth
    return cv2.resize(plane, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def read_placed(working: np.ndarray, left: int, top: int, channel: Channel) -> WatermarkReading:
    """The mark of a working-size picture of which ``working`` is the part at (``left``, ``top``)."""
    sums, noise = bit_sums(*cell_detail(working, left, top))
    confidence = float(np.mean(np.abs(sums) / noise))
    return WatermarkReading(WatermarkPayload.from_code(sums > 0), confidence, channel.name)


def cell_detail(working: np.ndarray, left: int, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Each grid cell's mean against its neighbours' (the picture's own slow changes taken out), outliers (edges)
    clipped, for the cells ``working`` (placed at ``left``, ``top``) covers with all their neighbours; and which
    cells those are."""
    cell = WORKING_SIDE // GRID
    canvas: np.ndarray = np.full((WORKING_SIDE, WORKING_SIDE), np.nan, dtype=np.float32)
    canvas[top : top + working.shape[0], left : left + working.shape[1]] = working
    cells = canvas.reshape(GRID, cell, GRID, cell).mean(axis=(1, 3))
    covered = ~np.isnan(cells)
    cells = np.where(covered, cells, 0)
    neighbours = cv2.blur(cells, (3, 3), borderType=cv2.BORDER_REFLECT)
    usable: np.ndarray = cv2.erode(covered.astype(np.uint8), np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REFLECT).astype(bool)
    detail = np.where(usable, cells - neighbours, 0)
    spread = float(np.median(np.abs(detail[usable]))) + 1e-3 if usable.any() else 1.0
    return np.clip(detail, -OUTLIER_SPREAD * spread, OUTLIER_SPREAD * spread), usable


def bit_sums(detail: np.ndarray, usable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each code bit's cells summed with their signs, and the noise of each sum: the spread of the cells about their
    bit's mean (what the mark does is the same in all of a bit's cells, what the picture does is not)."""
    signs, bit_of_cell = layout()
    bits, used = bit_of_cell.ravel(), usable.ravel()
    contributions = (signs * detail).ravel()
    sums = np.bincount(bits, weights=contributions, minlength=CODE_BITS)
    counts = np.maximum(np.bincount(bits, weights=used.astype(np.float64), minlength=CODE_BITS), 1)
    residuals = contributions - (sums / counts)[bits]
    noise = float(np.std(residuals[used])) * np.sqrt(counts) + 1e-9
    return sums, noise
