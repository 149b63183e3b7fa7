"""Channel types: the built-in ones and those installed packages add through the entry-point group
``imm_router.channels`` — the one place that knows which config model and sender serve which type.

A plugin's entry point is named after its type and points at its channel class, which has a
``config_model`` (a ChannelConfigBase subclass whose ``type`` is ``Literal["<that name>"]``) and is
built as ``cls(name, config)``; see README "Third-party channels". A plugin that fails to load is
reported (``imm-router check``, the log) and left out; the built-in types work regardless.
"""

from __future__ import annotations

import functools
import logging
import typing
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

from router.channels.alertmanager import AlertmanagerChannel, AlertmanagerConfig
from router.channels.base import Channel, ChannelConfigBase, Scrubber
from router.channels.dingtalk import DingTalkChannel, DingTalkConfig
from router.channels.email import EmailChannel, EmailConfig
from router.channels.kafka import KafkaChannel, KafkaChannelConfig
from router.channels.webhook import WebhookChannel, WebhookConfig
from router.errors import ConfigError

if TYPE_CHECKING:  # router.config imports this module
    from router.config import KafkaSettings

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "imm_router.channels"
BUILT_IN = "built in"

# A sender for a config: (channel name, config, the source's Kafka settings) -> channel.
Factory = Callable[[str, Any, "KafkaSettings"], Channel]


@dataclass(frozen=True)
class ChannelType:
    name: str
    config: type[ChannelConfigBase]
    factory: Factory
    origin: str  # BUILT_IN, or "<package> <version>, <module>:<class>"


@dataclass(frozen=True)
class PluginProblem:
    """An entry point of ``imm_router.channels`` that could not be used."""

    type: str
    package: str
    reason: str

    def __str__(self) -> str:
        return f"channel type {self.type!r} from package {self.package}: {self.reason}"


def _webhook(name: str, config: WebhookConfig, kafka: KafkaSettings) -> Channel:
    try:
        return WebhookChannel(name, config)
    except ValueError:
        # Not the validation text: it quotes the URL, token and all.
        raise ConfigError(f"channel {name!r}: url is not a valid http(s) URL") from None


_BUILT_IN = (
    ChannelType("email", EmailConfig, lambda name, config, kafka: EmailChannel(name, config), BUILT_IN),
    ChannelType("dingtalk", DingTalkConfig, lambda name, config, kafka: DingTalkChannel(name, config), BUILT_IN),
    ChannelType("kafka", KafkaChannelConfig, KafkaChannel, BUILT_IN),
    ChannelType("webhook", WebhookConfig, _webhook, BUILT_IN),
    ChannelType(
        "alertmanager", AlertmanagerConfig, lambda name, config, kafka: AlertmanagerChannel(name, config), BUILT_IN
    ),
)


def channel_types() -> tuple[dict[str, ChannelType], list[PluginProblem]]:
    """Every channel type by name, and the plugins that could not be used. Installed packages are looked
    up on each call (a few ms: once per config load), each entry point is imported once."""
    types = {t.name: t for t in _BUILT_IN}
    problems = []
    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if entry.name in types:  # not even imported: a plugin cannot replace a type
            problems.append(PluginProblem(entry.name, _package(entry), f"type taken by {types[entry.name].origin}"))
            continue
        found = _load(entry)
        if isinstance(found, PluginProblem):
            problems.append(found)
        else:
            types[found.name] = found
    return types, problems


def _package(entry: EntryPoint) -> str:
    return f"{entry.dist.name} {entry.dist.version}" if entry.dist is not None else f"(unknown package) {entry.value}"


@functools.cache
def _load(entry: EntryPoint) -> ChannelType | PluginProblem:
    package = _package(entry)
    problem: PluginProblem | None
    try:
        cls = entry.load()
    except Exception as exc:  # whatever a broken package raises, the built-in types must still work
        problem = PluginProblem(entry.name, package, f"cannot import {entry.value}: {type(exc).__name__}: {exc}")
    else:
        problem = _check(entry.name, package, cls)
    if problem is not None:
        log.warning("%s; the other channel types still work", problem)
        return problem
    origin = f"{package}, {entry.value}"
    return ChannelType(entry.name, cls.config_model, lambda name, config, kafka: cls(name, config), origin)


def _check(name: str, package: str, cls: Any) -> PluginProblem | None:
    """What is wrong with a plugin's channel class, or None."""

    def problem(reason: str) -> PluginProblem:
        return PluginProblem(name, package, reason)

    model = getattr(cls, "config_model", None)
    if not isinstance(model, type) or not issubclass(model, ChannelConfigBase):
        return problem("its class needs config_model, a subclass of router.channels.base.ChannelConfigBase")
    field = model.model_fields.get("type")
    if field is None or typing.get_origin(field.annotation) is not typing.Literal:
        return problem(f'{model.__name__} needs a field type: Literal["{name}"]')
    if typing.get_args(field.annotation) != (name,):
        return problem(f'{model.__name__}.type must be Literal["{name}"], the entry point\'s name')
    missing = [m for m in ("send", "health", "close") if not callable(getattr(cls, m, None))]
    if missing:
        return problem(f"its class lacks {', '.join(missing)} (the channel protocol)")
    return None


def make_channel(name: str, config: ChannelConfigBase, *, kafka_defaults: KafkaSettings) -> Channel:
    """A sender for ``config``; it connects on first use. ``kafka_defaults``: the source's Kafka settings,
    whose bootstrap servers, client id and SASL / SSL a Kafka channel uses."""
    kind = channel_types()[0].get(config.type)
    if kind is None or not isinstance(config, kind.config):
        raise ConfigError(f"channel {name!r}: no sender for {type(config).__name__}")
    return kind.factory(name, config, kafka_defaults)


def scrubber(config: ChannelConfigBase, *, kafka_defaults: KafkaSettings) -> Scrubber:
    """Masks every secret an error about this channel could show: its own, and the source's SASL password
    (a Kafka channel connects with it)."""
    sasl = kafka_defaults.sasl_password
    return Scrubber((*config.secret_values(), sasl.get_secret_value() if sasl else ""))
