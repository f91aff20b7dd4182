"""C2PA Content Credentials: the operator's signing certificate (or a development pair made at first start), the
manifest each generated image carries, and reading a file's credentials back with c2pa-python's reader."""

import datetime
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import c2pa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sd_server.errors import ConfigurationError

logger = logging.getLogger(__name__)
DEV_CHAIN_FILE, DEV_KEY_FILE = "dev-signer-chain.pem", "dev-signer-key.pem"
CURVE_ALGORITHMS = {"secp256r1": c2pa.C2paSigningAlg.ES256, "secp384r1": c2pa.C2paSigningAlg.ES384, "secp521r1": c2pa.C2paSigningAlg.ES512}
SIGNATURE_HOLDS = {"Valid", "Trusted"}  # c2pa's validation states in which the signature and the hashes hold


@dataclass(frozen=True)
class SigningIdentity:
    """The certificate chain (PEM, signer first) and private key (PEM) manifests are signed with."""

    chain_pem: bytes
    key_pem: bytes
    development: bool

    @property
    def certificate(self) -> x509.Certificate:
        """The signing certificate (the chain's first)."""
        return x509.load_pem_x509_certificates(self.chain_pem)[0]

    @property
    def common_name(self) -> str:
        """The signing certificate's common name, as readers show it."""
        names = self.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else self.certificate.subject.rfc4514_string()

    @property
    def issuers_pem(self) -> bytes:
        """The chain's certificates after the signer's (its CA, for the development pair), as PEM."""
        issuers = x509.load_pem_x509_certificates(self.chain_pem)[1:]
        return b"".join(certificate.public_bytes(serialization.Encoding.PEM) for certificate in issuers)

    @property
    def algorithm(self) -> c2pa.C2paSigningAlg:
        """The C2PA signing algorithm the key calls for."""
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in CURVE_ALGORITHMS:
            return CURVE_ALGORITHMS[key.curve.name]
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return c2pa.C2paSigningAlg.ED25519
        if isinstance(key, rsa.RSAPrivateKey):
            return c2pa.C2paSigningAlg.PS256
        raise ConfigurationError(f"SD_C2PA_KEY: a {type(key).__name__} cannot sign C2PA manifests; use EC P-256/384/521, Ed25519 or RSA")


def load_identity(cert: Path | None, key: Path | None, development_dir: Path) -> SigningIdentity:
    """The operator's pair (SD_C2PA_CERT and SD_C2PA_KEY), checked to belong together; without them, the development
    pair in ``development_dir``, made there the first time."""
    if (cert is None) != (key is None):
        raise ConfigurationError("SD_C2PA_CERT and SD_C2PA_KEY go together: set both, or neither for a development pair")
    if cert is not None and key is not None:
        identity = SigningIdentity(read_pem(cert, "SD_C2PA_CERT"), read_pem(key, "SD_C2PA_KEY"), development=False)
    else:
        identity = development_identity(development_dir)
    check_pair(identity)
    return identity


def read_pem(path: Path, setting: str) -> bytes:
    """The PEM file ``setting`` names; ConfigurationError naming it when it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConfigurationError(f"{setting}: cannot read {path} ({error.strerror})") from error


def check_pair(identity: SigningIdentity) -> None:
    """ConfigurationError unless the chain parses and its first certificate is the key's."""
    try:
        public = identity.certificate.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        key = serialization.load_pem_private_key(identity.key_pem, password=None)
    except (ValueError, TypeError) as error:
        raise ConfigurationError(f"SD_C2PA_CERT / SD_C2PA_KEY: not a PEM certificate chain and unencrypted PEM key ({error})") from error
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != public:
        raise ConfigurationError("SD_C2PA_KEY is not the key of SD_C2PA_CERT's first certificate")
    identity.algorithm  # noqa: B018  (raises for a key type C2PA does not sign with)


def development_identity(directory: Path) -> SigningIdentity:
    """The development pair kept in ``directory``: a CA of its own and a signing certificate it issued, made once."""
    chain_file, key_file = directory / DEV_CHAIN_FILE, directory / DEV_KEY_FILE
    if not (chain_file.exists() and key_file.exists()):
        directory.mkdir(parents=True, exist_ok=True)
        chain_pem, key_pem = make_development_pair()
        descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(key_pem)
        chain_file.write_bytes(chain_pem)
        logger.warning("made a development C2PA signing pair in %s: readers will not trust it; set SD_C2PA_CERT and SD_C2PA_KEY", directory)
    return SigningIdentity(chain_file.read_bytes(), key_file.read_bytes(), development=True)


def make_development_pair() -> tuple[bytes, bytes]:
    """A new development CA and an ES256 signing certificate it issued, as C2PA asks of one (not a CA, digital
    signature use, e-mail protection purpose): the chain (signer, then CA) and the signer's key, in PEM."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, signer_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sd-server development"), x509.NameAttribute(NameOID.COMMON_NAME, "sd-server development CA")])
    signer_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sd-server development"), x509.NameAttribute(NameOID.COMMON_NAME, "sd-server development signer")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    signer = (
        x509.CertificateBuilder().subject_name(signer_name).issuer_name(ca_name).public_key(signer_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(signer_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    chain = signer.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM)
    key = signer_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return chain, key


def key_usage(certificates: bool) -> x509.KeyUsage:
    """Key usage: signing certificates and CRLs (a CA), or digital signatures (a signer)."""
    return x509.KeyUsage(
        digital_signature=not certificates, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=certificates, crl_sign=certificates, encipher_only=False, decipher_only=False,
    )


@dataclass
class Manifest:
    """What one image's manifest says: created by the generator, of that source type (an inpainting is a composite),
    with the input image (and its own credentials) as an ingredient when it had some, and any extra assertions."""

    title: str
    generator: str
    version: str
    source_type: str
    assertions: list[dict[str, object]] = field(default_factory=list)
    ingredient: bytes | None = None  # the input image as uploaded, when it carried credentials

    def definition(self) -> dict[str, object]:
        """The manifest definition c2pa's Builder takes."""
        agent = {"name": self.generator, "version": self.version}
        actions = [{"action": "c2pa.created", "digitalSourceType": self.source_type, "softwareAgent": agent}]
        return {
            "claim_generator_info": [agent],
            "title": self.title,
            "format": "image/png",
            "assertions": [{"label": "c2pa.actions", "data": {"actions": actions}}, *self.assertions],
        }


class CredentialSigner:
    """Signs PNGs with the identity's certificate; thread-safe (c2pa guards its own handles)."""

    def __init__(self, identity: SigningIdentity) -> None:
        self.identity = identity
        self._context = c2pa.Context(c2pa.Settings().set("builder.thumbnail.enabled", "false"))
        self._signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(identity.algorithm, identity.chain_pem, identity.key_pem, None))

    def sign(self, png: bytes, manifest: Manifest) -> bytes:
        """``png`` with ``manifest`` embedded and signed (its hash covers every other byte of the file)."""
        builder = c2pa.Builder(json.dumps(manifest.definition()), self._context)
        if manifest.ingredient is not None:
            ingredient = {"title": "input image", "relationship": "inputTo"}
            builder.add_ingredient(json.dumps(ingredient), media_type(manifest.ingredient), io.BytesIO(manifest.ingredient))
        signed = io.BytesIO()
        builder.sign(self._signer, "image/png", io.BytesIO(png), signed)
        return signed.getvalue()


@dataclass(frozen=True)
class CredentialReading:
    """A file's C2PA credentials as the reader found them: its validation state (Trusted, Valid or Invalid), what
    failed, and what the active manifest says."""

    state: str
    failures: list[str]
    manifest: dict[str, Any]

    @property
    def signature_holds(self) -> bool:
        """True when the signature verifies and every hash matches the file."""
        return self.state in SIGNATURE_HOLDS


def read_credentials(data: bytes, trust_anchors: bytes | None = None) -> CredentialReading | None:
    """The credentials embedded in ``data`` (any format c2pa reads), or None when it has none; ``trust_anchors``
    (PEM) are the CAs whose certificates make a valid manifest Trusted."""
    settings = c2pa.Settings.from_dict({"trust": {"user_anchors": trust_anchors.decode()}} if trust_anchors else {})
    try:
        reader = c2pa.Reader(media_type(data), io.BytesIO(data), context=c2pa.Context(settings))
    except (c2pa.C2paError.ManifestNotFound, c2pa.C2paError.NotSupported):
        return None  # none there, or a format that cannot carry any (BMP)
    except c2pa.C2paError as error:
        return CredentialReading("Invalid", [str(error)], {})
    with reader:
        results = reader.get_validation_results() or {}
        failures = [str(entry.get("code")) for entry in (results.get("activeManifest") or {}).get("failure", [])]
        return CredentialReading(reader.get_validation_state() or "Invalid", failures, reader.get_active_manifest() or {})


def has_credentials(data: bytes) -> bool:
    """True when ``data`` carries C2PA credentials (valid or not)."""
    return read_credentials(data) is not None


def media_type(data: bytes) -> str:
    """The media type of an image file, by its first bytes (c2pa reads these four kinds)."""
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "image/tiff" if data[:4] in (b"II*\x00", b"MM\x00*") else "application/octet-stream"
