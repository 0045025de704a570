"""Owns making a confined container's network namespace: owned by a user namespace of its own, mapped as the
container's, which the container joins (see launcher), since CRIU dumps a network namespace only with the user
namespace that owns it; made by a helper program."""

from __future__ import annotations

import json
import os
from typing import Any

from kerrickpt import helper, namespaces, netlinks
from kerrickpt.errors import HostError
from kerrickpt.idmap import IdMap


def make(netns: str, owner: IdMap) -> None:
    """The network namespace `netns`, pinned in netlinks.NETNS_DIR, owned by a new user namespace mapped as `owner`:
    made by a helper program (a process must join that user namespace to make it, and only a fork can)."""
    order = {"netns": netns, "owner": owner.to_dict()}
    answer = helper.ask("netns", order, timeout=netlinks.TIMEOUT, what=f"making {netns}")
    if "error" in answer:
        raise HostError(f"could not make the network namespace {netns}: {answer['error']}")


def main(order: dict[str, Any]) -> None:  # pragma: no cover - the helper program "netns"
    """Make the network namespace order["netns"] in a new user namespace mapped as order["owner"] (IdMap.to_dict),
    and pin it: print {} once it is, or {"error": ...}."""
    try:
        userns = namespaces.mapped_user_namespace(IdMap.from_dict(order["owner"]))
        try:
            with namespaces.holding(namespaces.CLONE_NEWNET, userns) as holder:
                netlinks.attach(order["netns"], holder)
        finally:
            os.close(userns)
        answer = {}
    except OSError as exc:
        answer = {"error": str(exc)}
    except HostError as exc:
        answer = {"error": f"{exc.message}: {exc.log_tail}" if exc.log_tail else exc.message}
    print(json.dumps(answer), flush=True)
