"""docs/asyncapi.yaml, for the tests: its schemas as validators, per channel.

Every frame a test client receives through ``tests.fix_apps.Sockets`` is checked
against its channel's messages when the test ends (:func:`check_frames`), so the
whole suite holds the gateway to the document, not only the AsyncAPI tests.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

DOCUMENT = Path(__file__).resolve().parent.parent / "docs" / "asyncapi.yaml"
ROOT = "urn:replyx:asyncapi"


@functools.cache
def document() -> dict[str, Any]:
    return yaml.safe_load(DOCUMENT.read_text())


def resolve(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def validator(doc: dict[str, Any], ref: str) -> Draft202012Validator:
    """A validator for the schema at ``ref``, with the document's other schemas reachable."""
    registry = Registry().with_resource(
        ROOT, Resource.from_contents(doc, default_specification=DRAFT202012)
    )
    return Draft202012Validator({"$ref": f"{ROOT}{ref}"}, registry=registry)


class Frames:
    """The frames a channel may send, by type, each with its payload's validator."""

    def __init__(self, doc: dict[str, Any], channel: str) -> None:
        sent = [op for op in doc["operations"].values()
                if op["action"] == "send" and op["channel"]["$ref"] == f"#/channels/{channel}"]
        assert len(sent) == 1, channel
        self.validators: dict[str, Draft202012Validator] = {}
        for ref in sent[0]["messages"]:
            message = resolve(doc, resolve(doc, ref["$ref"])["$ref"])
            self.validators[message["name"]] = validator(doc, message["payload"]["$ref"])

    def check(self, frame: dict[str, Any]) -> None:
        assert frame.get("type") in self.validators, f"a frame the document does not list: {frame}"
        self.validators[frame["type"]].validate(frame)



#: The document's channel of each endpoint, by the path's prefix (the SSE twins send the same).
CHANNELS = (
    ("dialogs/", "adminDialog"), ("widget/dialogs/", "widgetDialog"),
    ("site/dialogs/", "siteDialog"), ("inbox", "inbox"),
)


@functools.cache
def frames_of(channel: str) -> Frames:
    return Frames(document(), channel)


def channel_of(url: str) -> str | None:
    path = urlsplit(url).path
    for prefix in ("/ws/", "/sse/"):
        if path.startswith(prefix):
            rest = path[len(prefix):]
            for start, channel in CHANNELS:
                if rest.startswith(start):
                    return channel
    return None


def check_frames(url: str, frames: list[dict[str, Any]]) -> None:
    """Every frame received on ``url`` is one its channel sends, valid against its schema."""
    channel = channel_of(url)
    if channel is None:
        return
    checker = frames_of(channel)
    for frame in frames:
        checker.check(frame)
