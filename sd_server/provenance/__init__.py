"""Provenance: every generated image says so, three ways (signed C2PA Content Credentials, the IPTC digital source
type in its XMP metadata, an invisible watermark), and any image can be checked for all three."""
