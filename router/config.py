"""The router's configuration: a YAML file (``--config``) with ``ROUTER_`` environment overrides."""

from __future__ import annotations

import functools
import os
import zoneinfo
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from router.alerting.inhibit import InhibitRule
from router.alerting.timing import TimeInterval
from router.channels.base import ChannelConfigBase, Frozen, PemFile, tls_context
from router.channels.registry import channel_types
from router.errors import ConfigError
from router.opsfile import describe_errors, expand_env, load_yaml
from router.sources.http import IngestSettings


@functools.cache
def _channels_adapter(models: tuple[type[ChannelConfigBase], ...]) -> TypeAdapter[dict[str, ChannelConfigBase]]:
    """``channels`` validated as a union of the channel types installed, discriminated by ``type``."""
    union = Annotated[Union[models], Field(discriminator="type")]  # type: ignore[valid-type]  # noqa: UP007
    return TypeAdapter(dict[str, union])


class KafkaSettings(Frozen):
    bootstrap_servers: str = "localhost:9092"
    topics: tuple[str, ...] = ("imm-events",)
    group_id: str = "imm-router"
    dead_letter_topic: str = "imm-router-dlq"
    # The router's own topics (created at start when missing; see README "Topics").
    notifications_topic: str = Field(
        default="imm-router-notifications", description="rendered notifications, keyed by channel"
    )
    notifications_partitions: int = Field(default=12, ge=1, description="when the router creates the topic")
    changelog_topic: str = Field(default="imm-router-changelog", description="per-channel state, compacted")
    silences_topic: str = Field(default="imm-router-silences", description="silences, compacted")
    inhibitions_topic: str = Field(default="imm-router-inhibitions", description="inhibiting source alerts")
    replication_factor: int = Field(default=1, ge=1, description="of the topics the router creates")
    # Every version reads both; versions before 2 read only 1, so 1 stays the default for one release and
    # a rolling upgrade never hands an old owner a record it cannot read (see README, "Upgrading").
    handoff_format: Literal[1, 2] = Field(default=1, description="2: smaller, and read without parsing the root")
    client_id: str = "imm-router"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    session_timeout_ms: int = Field(default=10_000, gt=0)
    heartbeat_interval_ms: int = Field(default=3_000, gt=0)
    # Every alert crosses two fetches (source, then notifications topic): an idle long poll of 25 ms keeps
    # their wait well under the alert's latency budget, at 40 fetches a second per idle consumer.
    fetch_max_wait_ms: int = Field(default=25, gt=0, description="a fetch returns at the latest after this")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: PemFile | None = None
    ssl_certfile: PemFile | None = None
    ssl_keyfile: PemFile | None = None

    def client_options(self) -> dict[str, Any]:
        """aiokafka connection keyword arguments: security protocol, SASL and TLS."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol.startswith("SASL"):
            options |= {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_plain_username": self.sasl_username,
                "sasl_plain_password": self.sasl_password.get_secret_value() if self.sasl_password else None,
            }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            options["ssl_context"] = tls_context(self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile)
        return options

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password
        ):
            raise ValueError(f"{self.security_protocol} needs sasl_mechanism, sasl_username and sasl_password")
        if self.security_protocol in ("SSL", "SASL_SSL"):
            tls_context(self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile)  # the files load, or say why not
        return self


class ServiceSettings(Frozen):
    drain_timeout_seconds: float = Field(default=25.0, gt=0, description="SIGTERM: finish in-flight work")
    # A partition's bound must hold more than one fetch (max_partition_fetch_bytes: ~1,300 IMM events of the
    # median seed size). aiokafka drops what it fetched for a paused partition, so with a smaller bound most
    # records are fetched more than once and routing waits on the broker (500 drained a backlog at 0.57x the
    # speed of 2,000).
    max_in_flight: int = Field(default=5_000, ge=1, description="records being routed, all partitions")
    max_in_flight_per_partition: int = Field(default=2_000, ge=1)
    max_pending_notifications: int = Field(
        default=20_000, ge=1, description="handed-off alerts a replica holds (in groups, throttles, sending)"
    )
    commit_interval_seconds: float = Field(default=1.0, gt=0)
    commit_every_records: int = Field(default=1_000, ge=1)
    dedup_ttl_seconds: float = Field(default=3_600.0, ge=0, description="0 turns duplicate suppression off")
    dedup_max_entries: int = Field(default=200_000, ge=1)
    reload_poll_seconds: float = Field(default=2.0, gt=0, description="how often files are checked for changes")
    health_interval_seconds: float = Field(default=30.0, gt=0, description="channel health checks for /readyz")
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="router processes in this pod (one per core it is given), see router.workers",
    )


class HttpSettings(Frozen):
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, lt=65536, description="/metrics, /healthz, /readyz; 0 = any")
    enabled: bool = True
    api_token: SecretStr | None = Field(
        default=None, description="bearer token for writes to /api/v1/silences; unset refuses writes"
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ROUTER_", env_nested_delimiter="__", extra="forbid", frozen=True, populate_by_name=True
    )

    rules_dir: Path = Path("rules")
    templates_dir: Path = Path("templates")
    timezone: str = "UTC"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    max_event_bytes: int = Field(default=1_048_576, gt=0)
    max_event_depth: int = Field(default=64, gt=0)
    render_timeout_seconds: float = Field(
        default=2.0, gt=0, description="one notification's rendering, all its template blocks; then a render error"
    )
    render_max_chars: int = Field(default=1_000_000, gt=0, description="what one notification's rendering may produce")
    channels: dict[str, ChannelConfigBase] = Field(default_factory=dict)
    kafka: KafkaSettings = KafkaSettings()
    service: ServiceSettings = ServiceSettings()
    http: HttpSettings = HttpSettings()
    ingest: IngestSettings = IngestSettings()
    time_intervals: tuple[TimeInterval, ...] = ()
    inhibit_rules: tuple[InhibitRule, ...] = ()

    @field_validator("channels", mode="wrap")
    @classmethod
    def _channel_types(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> dict[str, ChannelConfigBase]:
        types, problems = channel_types()
        broken = {p.type: p for p in problems}
        if isinstance(value, dict):
            for name, channel in value.items():
                kind = channel.get("type") if isinstance(channel, dict) else None
                if isinstance(kind, str) and kind not in types and kind in broken:
                    raise ValueError(f"channel {name!r}: {broken[kind]}; fix or reinstall that package")
        return _channels_adapter(tuple(t.config for t in types.values())).validate_python(value)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}; use an IANA name like Asia/Shanghai") from exc
        return value

    @model_validator(mode="after")
    def _ingest_has_a_home(self) -> Settings:
        if self.ingest.enabled and not self.http.enabled:
            raise ValueError("ingest is served by the HTTP server: set http.enabled: true")
        if self.ingest.topic is not None and self.ingest.topic not in self.kafka.topics:
            raise ValueError(
                f"ingest.topic {self.ingest.topic!r} is not one of kafka.topics {list(self.kafka.topics)}: "
                "this router would never route what it ingests"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file, which is handed in as init data.
        return (env_settings, init_settings)


def env_variable(field: str) -> str:
    return f"{Settings.model_config['env_prefix']}{field.upper()}"


def _env_origin(env: dict[str, Any]) -> Callable[[tuple[int | str, ...]], str | None]:
    """Which ROUTER_ variable set the value at a location, given what the environment source supplied."""
    prefix = Settings.model_config["env_prefix"]
    names = {name.upper() for name in os.environ}

    def origin(loc: tuple[int | str, ...]) -> str | None:
        node: Any = env
        for depth, part in enumerate(loc):
            if not isinstance(node, dict) or part not in node:
                # A missing key belongs to the source of its mapping; otherwise the file set it.
                if depth < len(loc) - 1 or depth == 0:
                    return None
                break
            node = node[part]
        for depth in range(len(loc), 0, -1):
            name = prefix + "__".join(str(p).upper() for p in loc[:depth])
            if name in names:
                return name
        return None

    return origin


def load_settings(path: Path) -> Settings:
    """Read the config file, expand ``${VAR}``, apply ``ROUTER_`` overrides, validate.

    Relative rules/templates directories are taken relative to the config file."""
    if not path.is_file():
        raise ConfigError("config file not found; pass --config PATH", path=str(path))
    doc: Any = expand_env(load_yaml(path), path)
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError("the config must be a mapping of keys (rules_dir, channels, kafka, …)", path=str(path))
    try:
        # Constructing (not model_validate) so the ROUTER_ environment source applies.
        settings = Settings(**doc)
    except SettingsError as exc:
        # pydantic-settings could not parse an override (ROUTER_CHANNELS='{bad'); its message names the field.
        field = str(exc).partition('field "')[2].partition('"')[0]
        raise ConfigError(
            f"environment variable {env_variable(field)} is not valid JSON; "
            f"give the whole {field} value as JSON, or use ROUTER_{field.upper()}__<KEY>=… overrides"
        ) from None
    except ValidationError as exc:
        env = EnvSettingsSource(Settings)()  # parsed already, so it does not raise here
        raise ConfigError(describe_errors(exc, doc, path, Settings, _env_origin(env))) from exc
    base = path.parent
    return settings.model_copy(
        update={
            "rules_dir": base / settings.rules_dir,
            "templates_dir": base / settings.templates_dir,
        }
    )
