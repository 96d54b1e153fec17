"""Reading image archives (docker-archive tars) that someone else made: every member with a bound.

An archive is hostile until checked: a 1 MB gzip file can hold a manifest.json of 1 GiB, a
tar can hold millions of members, a JSON document can nest deeper than Python recurses. These
helpers read small members only up to a limit taken from the tar header before reading, count
members, and turn every malformation into one `ValueError` that the caller words for its user.
"""

from __future__ import annotations

import json
import tarfile
from typing import Any

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_LAYER_ENTRIES",
    "MAX_MANIFEST_BYTES",
    "MAX_MEMBERS",
    "index_members",
    "read_json",
    "read_member",
]

#: manifest.json of a docker-archive: a few hundred bytes per image.
MAX_MANIFEST_BYTES = 1 << 20
#: An image config: labels (the self-check trace included) and history; a few KiB in practice.
MAX_CONFIG_BYTES = 8 << 20
#: Members of the outer archive: a few per layer.
MAX_MEMBERS = 100_000
#: Entries of one layer that `diff` lists (a CUDA torch layer holds about 50,000).
MAX_LAYER_ENTRIES = 2_000_000


def index_members(tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    """Name -> member of every member of `tar` (the last of a name wins, as tar extracts)."""
    found: dict[str, tarfile.TarInfo] = {}
    count = 0
    while (member := tar.next()) is not None:
        count += 1
        if count > MAX_MEMBERS:
            raise ValueError(f"it holds more than {MAX_MEMBERS} members")
        found[member.name.removeprefix("./")] = member
    return found


def read_member(
    tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], name: str, limit: int
) -> bytes:
    """The bytes of the regular member `name`, refused when its header says more than `limit`."""
    member = members.get(name.removeprefix("./"))
    if member is None or not member.isreg():
        raise ValueError(f"the member {name[:200]!r} is missing or not a file")
    if member.size > limit:
        raise ValueError(
            f"the member {name[:200]!r} is {member.size} bytes, more than {limit} allowed"
        )
    stream = tar.extractfile(member)
    if stream is None:
        raise ValueError(f"the member {name[:200]!r} cannot be read")
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"the member {name[:200]!r} holds more than {limit} bytes")
    return data


def read_json(
    tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], name: str, limit: int
) -> Any:
    """A member parsed as JSON, bounded in size; any malformation is a ValueError."""
    data = read_member(tar, members, name, limit)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"the member {name[:200]!r} is not JSON ({type(err).__name__})") from None
