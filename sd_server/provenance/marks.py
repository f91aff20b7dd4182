"""Marking every generated image (watermark, XMP metadata, then signed credentials over it all) and verifying any
image for all three."""

import hashlib
import io
from dataclasses import dataclass

from PIL import Image

from config import Settings
from sd_server import VERSION
from sd_server.provenance import watermark
from sd_server.provenance.credentials import (
    DEV_CHAIN_FILE,
    CredentialReading,
    CredentialSigner,
    Manifest,
    load_identity,
    read_credentials,
    read_pem,
)
from sd_server.provenance.metadata import (
    COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
    TRAINED_ALGORITHMIC_MEDIA,
    XMP_KEY,
    read_xmp,
    xmp_packet,
)
from sd_server.provenance.watermark import WatermarkPayload, WatermarkReading
from sd_server.storage.photos import open_upright, opened
from sd_server.storage.png_text import with_text
from sd_server.storage.source_images import png_bytes as encode_png

GENERATOR = "sd-server"
MIN_WATERMARK_SIDE = 128  # two pixels a grid cell: smaller pictures carry the credentials and metadata only
AI_SOURCE_TYPES = {TRAINED_ALGORITHMIC_MEDIA, COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA}


@dataclass(frozen=True)
class ImageFacts:
    """What the marks of one generated image say: its job and place in it, the model, the A1111 parameters, the
    fingerprint its watermark carries, an inpainting's mask (a PNG, white: repainted; the picture is a composite of
    the user's), and the input image as uploaded when it had credentials."""

    job_id: str
    index: int
    model_id: str
    parameters: str
    fingerprint: str
    repaint_mask: bytes | None = None
    input_credentials: bytes | None = None

    @property
    def inpainting(self) -> bool:
        """True for an inpainting: only its mask was generated."""
        return self.repaint_mask is not None


@dataclass(frozen=True)
class CredentialsFound:
    """The C2PA credentials a verified file carries, summarised."""

    state: str
    signature_valid: bool
    trusted: bool
    failures: list[str]
    signer: str | None
    issuer: str | None
    generator: str | None
    digital_source_type: str | None
    ingredients: int


@dataclass(frozen=True)
class MetadataFound:
    """The XMP metadata a verified file carries."""

    digital_source_type: str | None
    creator_tool: str | None


@dataclass(frozen=True)
class WatermarkFound:
    """The watermark read from a verified file's pixels."""

    service_id: int
    this_service: bool
    fingerprint: str
    confidence: float


@dataclass(frozen=True)
class Verification:
    """What POST /provenance/verify found: each mark (None: not there) and whether any says the image was generated."""

    credentials: CredentialsFound | None
    metadata: MetadataFound | None
    watermark: WatermarkFound | None
    watermark_confidence: float

    @property
    def generated(self) -> bool:
        """True when a mark says so: credentials whose signature holds, metadata, or a watermark."""
        signed_ai = self.credentials is not None and self.credentials.signature_valid and self.credentials.digital_source_type in AI_SOURCE_TYPES
        tagged_ai = self.metadata is not None and self.metadata.digital_source_type in AI_SOURCE_TYPES
        return signed_ai or tagged_ai or self.watermark is not None


class Provenance:
    """The marks this service puts on its images, as the settings turn each on, and the reader of anyone's."""

    def __init__(self, settings: Settings, signing: bool = True) -> None:
        """Load (or make) the signing pair when SD_C2PA is on; ``signing=False`` (a reader only, as the CLI) leaves
        the signer out but still trusts its issuers, when the pair is there."""
        self.settings = settings
        self.signer: CredentialSigner | None = None
        self.trust_anchors = read_pem(settings.c2pa_trust_anchors, "SD_C2PA_TRUST_ANCHORS") if settings.c2pa_trust_anchors else b""
        development_dir = settings.data_dir / "c2pa"
        if settings.c2pa and (signing or settings.c2pa_cert or (development_dir / DEV_CHAIN_FILE).exists()):
            identity = load_identity(settings.c2pa_cert, settings.c2pa_key, development_dir)
            self.trust_anchors = identity.issuers_pem + self.trust_anchors
            self.signer = CredentialSigner(identity) if signing else None

    def report(self) -> dict[str, object]:
        """Which marks are on, for /health."""
        identity = self.signer.identity if self.signer else None
        return {
            "c2pa": self.settings.c2pa,
            "c2pa_signer": identity.common_name if identity else None,
            "c2pa_development_certificate": identity.development if identity else None,
            "iptc_metadata": self.settings.iptc_metadata,
            "watermark": self.settings.watermark,
            "watermark_service_id": self.settings.watermark_service_id,
        }

    def watermark(self, image: Image.Image | bytes, facts: ImageFacts) -> Image.Image | bytes:
        """The picture with its watermark when SD_WATERMARK is on and it is MIN_WATERMARK_SIDE a side or more, as it
        came: a Pillow image (the local engine's), or PNG bytes (a Ray replica's: decoded and encoded again)."""
        if not self.settings.watermark:
            return image
        picture = Image.open(io.BytesIO(image)).convert("RGB") if isinstance(image, bytes) else image
        if min(picture.size) < MIN_WATERMARK_SIDE:
            return image
        payload = WatermarkPayload(self.settings.watermark_service_id, facts.fingerprint)
        region = Image.open(io.BytesIO(facts.repaint_mask)).resize(picture.size) if facts.repaint_mask else None
        marked = watermark.embed(picture, payload, self.settings.watermark_strength, region)
        return encode_png(marked) if isinstance(image, bytes) else marked

    def seal(self, png: bytes, facts: ImageFacts) -> bytes:
        """The encoded PNG with the XMP source type (a chunk added, nothing re-encoded), then signed credentials over
        every byte of it (so a changed pixel or chunk breaks the signature), as the settings turn each on."""
        if self.settings.iptc_metadata:
            png = with_text(png, XMP_KEY, xmp_packet(source_type(facts), f"{GENERATOR} {VERSION}"), international=True)
        if self.signer is not None:
            png = self.signer.sign(png, self._manifest(facts))
        return png

    def _manifest(self, facts: ImageFacts) -> Manifest:
        """The credentials of the image ``facts`` describe."""
        assertions: list[dict[str, object]] = []
        if self.settings.c2pa_record_generation:
            parameters_sha256 = hashlib.sha256(facts.parameters.encode()).hexdigest()
            assertions.append({"label": "org.sd-server.generation", "data": {"model_id": facts.model_id, "parameters_sha256": parameters_sha256}})
        title = f"{facts.job_id}-{facts.index}.png"
        return Manifest(title, GENERATOR, VERSION, source_type(facts), assertions, facts.input_credentials)

    def verify(self, data: bytes, name: str) -> Verification:
        """Every mark of the image file ``data``: its credentials checked against this service's issuers and
        SD_C2PA_TRUST_ANCHORS, its XMP, and the watermark in its pixels (cropped copies searched). InvalidPhotoError
        (422 at ``image``, naming ``name``) when it is not an image, or too large to decode."""
        with opened(name, data, "image") as header:
            metadata = metadata_found(header)
        image = open_upright(name, data, "image")
        credentials = read_credentials(data, self.trust_anchors or None)
        reading = watermark.read(image) if min(image.size) >= watermark.GRID else WatermarkReading(None, 0.0)
        return Verification(
            credentials=credentials_found(credentials) if credentials else None,
            metadata=metadata,
            watermark=self._watermark_found(reading),
            watermark_confidence=round(reading.confidence, 2),
        )

    def _watermark_found(self, reading: WatermarkReading) -> WatermarkFound | None:
        """The watermark's payload, and whether this service made it (by its id)."""
        if reading.payload is None:
            return None
        payload = reading.payload
        this_service = payload.service_id == self.settings.watermark_service_id
        return WatermarkFound(payload.service_id, this_service, payload.fingerprint, round(reading.confidence, 2))


def fingerprint(parameters: str) -> str:
    """A picture's fingerprint: the first 40 bits of the SHA-256 of its A1111 parameters text (prompt, seed, size...),
    in hex; the same request and seed give the same one (and the same pixels)."""
    return hashlib.sha256(parameters.encode()).hexdigest()[:10]


def source_type(facts: ImageFacts) -> str:
    """trainedAlgorithmicMedia; an inpainting, a composite with it."""
    return COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA if facts.inpainting else TRAINED_ALGORITHMIC_MEDIA


def credentials_found(reading: CredentialReading) -> CredentialsFound:
    """The reader's findings summarised: state, failures, signer, generator, source type, ingredients."""
    manifest = reading.manifest
    signature = manifest.get("signature_info") or {}
    generators = manifest.get("claim_generator_info") or [{}]
    generator = generators[0] if isinstance(generators, list) and generators else {}
    actions = [
        action
        for assertion in manifest.get("assertions") or []
        if str(assertion.get("label", "")).startswith("c2pa.actions")
        for action in (assertion.get("data") or {}).get("actions", [])
    ]
    return CredentialsFound(
        state=reading.state,
        signature_valid=reading.signature_holds,
        trusted=reading.state == "Trusted",
        failures=reading.failures,
        signer=signature.get("common_name"),
        issuer=signature.get("issuer"),
        generator=" ".join(str(part) for part in (generator.get("name"), generator.get("version")) if part) or None,
        digital_source_type=next((action.get("digitalSourceType") for action in actions if action.get("digitalSourceType")), None),
        ingredients=len(manifest.get("ingredients") or []),
    )


def metadata_found(image: Image.Image) -> MetadataFound | None:
    """The XMP of a PNG (its iTXt chunk) or a JPEG/WebP (its APP1 or XMP chunk), if it has one."""
    packet = image.info.get(XMP_KEY) or image.info.get("xmp")
    if not packet:
        return None
    text = packet.decode("utf-8", "replace") if isinstance(packet, bytes) else str(packet)
    source, tool = read_xmp(text)
    return MetadataFound(source, tool)

