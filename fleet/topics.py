"""Topic names: `<prefix>/<fleet>/<device>/<kind>`, the one place they are built and parsed.

From the device: status (birth and last will, retained), heartbeat, telemetry, events,
audit, reported (retained), deploy, and command responses. To the device: desired
(retained), cmd, and ack (the controller's confirmation that it stored a batch).

Fleet and device ids are single topic levels of safe characters, so a name can never
reach into another device's subtree (the broker's ACL pins a device to its own, by
certificate).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal, get_args

FromDevice = Literal["status", "heartbeat", "telemetry", "events", "audit", "reported",
                     "deploy", "response"]
ToDevice = Literal["desired", "cmd", "ack"]
Kind = FromDevice | ToDevice
FROM_DEVICE: Final = frozenset(get_args(FromDevice))
TO_DEVICE: Final = frozenset(get_args(ToDevice))
# One topic level: letters, digits, '.', '_', '-' (no '/', '+', '#', '$', controls).
NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(kind: str, value: str) -> str:
    if not NAME.fullmatch(value):
        raise ValueError(f"invalid {kind} {value!r}: 1-64 of A-Z a-z 0-9 . _ -, "
                         "starting with a letter or digit")
    return value


@dataclass(frozen=True, slots=True)
class Topics:
    """The topics of one device."""

    prefix: str
    fleet: str
    device: str

    def __post_init__(self) -> None:
        check_name("fleet", self.fleet)
        check_name("device id", self.device)

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.fleet}/{self.device}"

    def __call__(self, kind: Kind) -> str:
        return f"{self.base}/{kind}"


def ingest_filters(prefix: str, group: str | None = None) -> list[str]:
    """What a controller subscribes to: every kind devices send (not what controllers send
    to devices), as shared subscriptions when `group` is given (MQTT 5 `$share/<group>/...`:
    the broker splits the traffic among the group's members)."""
    share = f"$share/{check_name('group', group)}/" if group else ""
    return [f"{share}{prefix}/+/+/{kind}" for kind in sorted(FROM_DEVICE)]


def parse(prefix: str, topic: str) -> tuple[str, str, str] | None:
    """(fleet, device, kind) of a topic under `prefix`, or None if it is not one of ours."""
    if not topic.startswith(prefix + "/"):
        return None
    parts = topic[len(prefix) + 1:].split("/")
    if len(parts) != 3:
        return None
    fleet, device, kind = parts
    if not (NAME.fullmatch(fleet) and NAME.fullmatch(device)):
        return None
    if kind not in FROM_DEVICE and kind not in TO_DEVICE:
        return None
    return fleet, device, kind
