"""Channel objects for channel configs: the one place that knows which sender serves which type."""

from __future__ import annotations

from typing import TYPE_CHECKING

from router.channels.alertmanager import AlertmanagerChannel, AlertmanagerConfig
from router.channels.base import Channel, ChannelConfigBase, Scrubber
from router.channels.dingtalk import DingTalkChannel, DingTalkConfig
from router.channels.email import EmailChannel, EmailConfig
from router.channels.kafka import KafkaChannel, KafkaChannelConfig
from router.channels.webhook import WebhookChannel, WebhookConfig
from router.errors import ConfigError

if TYPE_CHECKING:  # router.config imports the channel modules
    from router.config import KafkaSettings


def make_channel(name: str, config: ChannelConfigBase, *, kafka_defaults: KafkaSettings) -> Channel:
    """A sender for ``config``; it connects on first use. ``kafka_defaults``: the source's Kafka settings,
    whose bootstrap servers, client id and SASL / SSL a Kafka channel uses."""
    if isinstance(config, EmailConfig):
        return EmailChannel(name, config)
    if isinstance(config, DingTalkConfig):
        return DingTalkChannel(name, config)
    if isinstance(config, KafkaChannelConfig):
        return KafkaChannel(name, config, kafka_defaults)
    if isinstance(config, AlertmanagerConfig):
        return AlertmanagerChannel(name, config)
    if isinstance(config, WebhookConfig):
        try:
            return WebhookChannel(name, config)
        except ValueError:
            # Not the validation text: it quotes the URL, token and all.
            raise ConfigError(f"channel {name!r}: url is not a valid http(s) URL") from None
    raise ConfigError(f"channel {name!r}: no sender for {type(config).__name__}")


def scrubber(config: ChannelConfigBase, *, kafka_defaults: KafkaSettings) -> Scrubber:
    """Masks every secret an error about this channel could show: its own, and the source's SASL password
    (a Kafka channel connects with it)."""
    sasl = kafka_defaults.sasl_password
    return Scrubber((*config.secret_values(), sasl.get_secret_value() if sasl else ""))
