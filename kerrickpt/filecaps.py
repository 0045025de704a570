"""Owns file capabilities (security.capability) across user namespaces: carried with the root they hold in
container-relative, and set again for the root of another id range."""

from __future__ import annotations

import struct

from kerrickpt.errors import ArchiveCorruptError, NotCheckpointable
from kerrickpt.idmap import IdMap

XATTR = "security.capability"
# linux/capability.h: a revision in the top byte of the first word, then (permitted, inheritable) pairs;
# revision 3 adds the host id of the root of the user namespace they are valid in.
REVISION_MASK = 0xFF000000
REVISION_3 = 0x03000000
PAIRS = {0x01000000: 1, 0x02000000: 2, REVISION_3: 2}
V3 = struct.Struct("<6I")


def carry(name: str, raw: bytes, ids: IdMap) -> str | None:
    """A file's capabilities as carried: revision 3, its root container-relative, in hex; None for capabilities
    that are void in the container (valid only in a user namespace whose root it does not own)."""
    magic = int.from_bytes(raw[:4], "little")
    pairs = PAIRS.get(magic & REVISION_MASK)
    if pairs is None or len(raw) != 4 + 8 * pairs + 4 * (magic & REVISION_MASK == REVISION_3):
        raise NotCheckpointable(f"/{name} in the container's file-system layer has a {XATTR} the kernel never writes")
    words = struct.unpack(f"<{len(raw) // 4}I", raw)
    sets = [*words[1 : 1 + 2 * pairs], *[0] * (4 - 2 * pairs)]
    root = words[5] if pairs == 2 and len(words) == 6 else 0
    # The host root's capabilities hold in every user namespace: the container's root's hold there.
    relative = 0 if root == 0 else ids.container_uid(root)
    if relative is None:
        return None
    return V3.pack(REVISION_3 | (magic & ~REVISION_MASK), *sets, relative).hex()


def restore(text: str, ids: IdMap) -> bytes:
    """The security.capability value for a carried one: revision 3, its root the target's host id."""
    try:
        words = list(V3.unpack(bytes.fromhex(text)))
    except (ValueError, struct.error) as exc:
        raise ArchiveCorruptError(f"the file-system layer carries a malformed capability {text!r}") from exc
    root = ids.host_uid(words[5])
    if words[0] & REVISION_MASK != REVISION_3 or root is None:
        raise ArchiveCorruptError(f"the file-system layer carries a capability {text!r} no layer of this node can hold")
    words[5] = root
    return V3.pack(*words)
