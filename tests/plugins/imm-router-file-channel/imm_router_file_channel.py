"""imm-router channel type ``file``: appends each alert to a file, one JSON line each."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from router.channels.base import ChannelConfigBase, PayloadMeta
from router.errors import DeliveryError
from router.notification import Notification


class FileConfig(ChannelConfigBase):
    required_blocks: ClassVar[tuple[str, ...]] = ("text",)  # the template blocks it renders

    type: Literal["file"]
    path: Path

    def build_payload(self, parts: Mapping[str, str], meta: PayloadMeta) -> dict[str, Any]:
        return {"event_id": meta.event_id, "rule": meta.rule, "text": parts["text"]}


class FileChannel:
    config_model = FileConfig

    def __init__(self, name: str, config: FileConfig) -> None:
        self.name = name
        self.path = config.path

    def _append(self, line: str) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")

    async def send(self, notification: Notification) -> None:
        line = json.dumps(notification.payload, ensure_ascii=False)
        try:
            await asyncio.to_thread(self._append, line)
        except OSError as exc:
            # A missing directory or a full disk may be fixed meanwhile: let the pipeline retry.
            error = f"cannot append to {self.path}: {exc.strerror}"
            raise DeliveryError(error, retriable=True, channel=self.name) from None

    async def health(self) -> str:
        if not self.path.parent.is_dir():
            raise DeliveryError(f"directory {self.path.parent} does not exist", retriable=True, channel=self.name)
        return f"appending to {self.path}"

    async def close(self) -> None:
        pass
