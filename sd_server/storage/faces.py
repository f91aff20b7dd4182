"""What a training photo of a person shows: its faces (OpenCV's bundled Haar cascades, frontal then profile), how
sharp the face is, and a perceptual hash that finds near-duplicate photos (a burst, a re-encode, a resize)."""

from dataclasses import dataclass
from functools import cache

import cv2
import numpy as np
from PIL import Image

DETECTION_SIDE = 640  # faces are looked for on a copy this long, which is plenty and keeps it ~50 ms a photo
MIN_NEIGHBOURS = 8  # overlapping detections a face needs: OpenCV's default 3 finds faces in coins and collars
MIN_FACE_SHARE = 0.04  # of the photo's short side: smaller windows are mostly false alarms
COMPANION_SHARE = 0.5  # a second face counts when at least half as wide as the largest (not a passer-by far behind)
FACE_CROP_SCALE = 4.0  # the square around a face is this many faces wide: head and shoulders
TINY_FACE_PIXELS = 64  # a face narrower than this in the photo has too little detail to learn
BLURRY_FACE = 50.0  # variance of the Laplacian of the face at 128 px: sharp phone faces are in the hundreds
HASH_SIDE = 16  # a difference hash of 16 x 16 bits
NEAR_DUPLICATE_BITS = 6  # of 256: a re-encode, resize or small exposure change; distinct poses differ far more


@dataclass(frozen=True)
class Face:
    """A face's box in the photo's pixels."""

    left: int
    top: int
    side: int

    @property
    def centre(self) -> tuple[float, float]:
        """The box's centre."""
        return self.left + self.side / 2, self.top + self.side / 2


@cache
def cascade(name: str) -> cv2.CascadeClassifier:
    """One of OpenCV's bundled cascades, loaded once."""
    classifier = cv2.CascadeClassifier(cv2.data.haarcascades + name)  # type: ignore[attr-defined]
    if classifier.empty():
        raise RuntimeError(f"OpenCV's {name} is missing: install opencv-python-headless 4.x (5.x has no Haar cascades)")
    return classifier


def grey(image: Image.Image, side: int) -> tuple[np.ndarray, float]:
    """The image in grey, its long side at most ``side``, and the factor back to the photo's pixels."""
    scale = min(1.0, side / max(image.size))
    small = image.convert("L").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BOX)
    return np.asarray(small), 1 / scale


def find_faces(image: Image.Image) -> list[Face]:
    """The faces in the photo that matter, largest first: frontal, else profile (either way round); a face much
    smaller than the largest (a passer-by) is left out."""
    pixels, back = grey(image, DETECTION_SIDE)
    least = max(24, round(min(pixels.shape) * MIN_FACE_SHARE))
    boxes = detect(pixels, "haarcascade_frontalface_default.xml", least)
    if not boxes:
        boxes = detect(pixels, "haarcascade_profileface.xml", least)
        boxes += [(pixels.shape[1] - x - w, y, w, h) for x, y, w, h in detect(pixels[:, ::-1], "haarcascade_profileface.xml", least)]
    faces = sorted((Face(round(x * back), round(y * back), round(max(w, h) * back)) for x, y, w, h in boxes), key=lambda face: -face.side)
    return [face for face in faces if face.side >= COMPANION_SHARE * faces[0].side]


def detect(pixels: np.ndarray, name: str, least: int) -> list[tuple[int, int, int, int]]:
    """The boxes one cascade finds, at least ``least`` pixels wide."""
    found = cascade(name).detectMultiScale(np.ascontiguousarray(pixels), scaleFactor=1.1, minNeighbors=MIN_NEIGHBOURS, minSize=(least, least))
    return [tuple(int(value) for value in box) for box in found]  # type: ignore[misc]


def square_around(image: Image.Image, face: Face, resolution: int) -> tuple[int, int, int, int]:
    """The square crop that keeps the face near its centre: FACE_CROP_SCALE faces wide, or ``resolution`` pixels
    where that is wider (nothing upsampled that need not be), at most the short side; moved inside the photo where
    the face is near an edge."""
    side = min(image.width, image.height, max(round(face.side * FACE_CROP_SCALE), resolution))
    centre_x, centre_y = face.centre
    left = min(max(round(centre_x - side / 2), 0), image.width - side)
    top = min(max(round(centre_y - side / 2), 0), image.height - side)
    return left, top, left + side, top + side


def face_sharpness(image: Image.Image, face: Face) -> float:
    """Variance of the Laplacian of the face, scaled to 128 px: low when it is out of focus or shaken."""
    region = image.crop((face.left, face.top, face.left + face.side, face.top + face.side)).convert("L").resize((128, 128), Image.Resampling.BOX)
    return float(cv2.Laplacian(np.asarray(region, dtype=np.float32), cv2.CV_32F).var())


def difference_hash(image: Image.Image) -> np.ndarray:
    """A 256-bit difference hash: whether each of 16 x 16 grey cells is brighter than its left neighbour."""
    cells = np.asarray(image.convert("L").resize((HASH_SIDE + 1, HASH_SIDE), Image.Resampling.LANCZOS), dtype=np.int16)
    return cells[:, 1:] > cells[:, :-1]


def near_duplicates(first: np.ndarray, second: np.ndarray) -> bool:
    """True when two hashes differ in at most NEAR_DUPLICATE_BITS bits."""
    return int(np.count_nonzero(first != second)) <= NEAR_DUPLICATE_BITS
