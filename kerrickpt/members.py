"""Owns the names an archive's members may have: the files kerrickpt writes, a chunk of one, its header and manifest."""

from __future__ import annotations

import re

from kerrickpt.manifest import NAME as MANIFEST_NAME

# Only these names are ever written or extracted: no paths, no links, no surprises.
SAFE_MEMBER = re.compile(r"(images/(?!\.\.?$)[A-Za-z0-9_.-]+|log|layer\.tar|layer-removed\.json)")
CHUNK_MEMBER = re.compile(r"(?P<name>.+)\.(?P<index>[0-9]{6})")
# The first member since version 3: how the members are checksummed, known before the first one is
# read (the manifest, which also says it, comes last). Without it, a member is checked with sha256.
HEADER = "format"


def allowed(name: str) -> bool:
    """A member kerrickpt writes: a safe file name, a chunk of one (a log grows past a chunk too), or its own."""
    chunk = CHUNK_MEMBER.fullmatch(name)
    return bool(SAFE_MEMBER.fullmatch(chunk["name"] if chunk else name)) or name in (HEADER, MANIFEST_NAME)
