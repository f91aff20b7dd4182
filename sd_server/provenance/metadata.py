"""The IPTC digital source type in a PNG's XMP packet (the iTXt chunk ``XML:com.adobe.xmp``), for the tools that read
metadata but not C2PA: photo managers, exiftool, the IPTC's own checks, and platforms' AI labels."""

import html
import re

XMP_KEY = "XML:com.adobe.xmp"
IPTC_SOURCE_TYPES = "http://cv.iptc.org/newscodes/digitalsourcetype/"
TRAINED_ALGORITHMIC_MEDIA = IPTC_SOURCE_TYPES + "trainedAlgorithmicMedia"
COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA = IPTC_SOURCE_TYPES + "compositeWithTrainedAlgorithmicMedia"
SOURCE_TYPE = re.compile(r'Iptc4xmpExt:DigitalSourceType(?:="([^"]*)"|>\s*([^<\s]+)\s*<)')
CREATOR_TOOL = re.compile(r'xmp:CreatorTool(?:="([^"]*)"|>\s*([^<]+?)\s*<)')


def xmp_packet(source_type: str, creator_tool: str) -> str:
    """An XMP packet naming the digital source type and the tool that made the image."""
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '  <rdf:Description rdf:about=""\n'
        '    xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"\n'
        '    xmlns:xmp="http://ns.adobe.com/xap/1.0/"\n'
        f'    Iptc4xmpExt:DigitalSourceType="{source_type}"\n'
        f'    xmp:CreatorTool="{escape(creator_tool)}"/>\n'
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="r"?>'
    )


def escape(text: str) -> str:
    """``text`` safe inside an XML attribute."""
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


def read_xmp(packet: str) -> tuple[str | None, str | None]:
    """The digital source type and creator tool an XMP packet names (attribute or element form), each None if not."""
    return first_value(SOURCE_TYPE, packet), first_value(CREATOR_TOOL, packet)


def first_value(pattern: re.Pattern[str], packet: str) -> str | None:
    """The first value ``pattern`` finds in ``packet`` (either of its two groups, XML entities resolved), or None."""
    match = pattern.search(packet)
    return html.unescape(match.group(1) or match.group(2)) if match else None
