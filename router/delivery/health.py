"""Live channel health: can each channel reach its server (SMTP EHLO/NOOP and AUTH, DingTalk and webhook
connect, Kafka metadata)? Used by ``imm-router check --live``. Nothing is sent: a channel whose
credentials only a message could verify (DingTalk, webhook) is reported "reachable", never "ok"."""

from __future__ import annotations

import asyncio

from router.channels import make_channel, scrubber
from router.channels.base import Channel, Scrubber
from router.engine import Engine
from router.errors import DeliveryError


async def probe(channel: Channel, timeout: float, scrub: Scrubber) -> tuple[bool, str]:
    """(healthy, what the check found) for one channel; never raises for the channel's problems."""
    try:
        async with asyncio.timeout(timeout):
            return True, await channel.health()
    except DeliveryError as exc:
        return False, str(exc)
    except TimeoutError:
        return False, f"no answer within {timeout:g}s"
    except Exception as exc:  # a check must report, not crash the others
        return False, scrub(f"{type(exc).__name__}: {exc}")


async def check_live(engine: Engine) -> int:
    """Print one line per channel; 0 if every channel is healthy, 1 otherwise."""
    settings = engine.settings
    configs = dict(sorted(settings.channels.items()))
    channels = {name: make_channel(name, config, kafka_defaults=settings.kafka) for name, config in configs.items()}
    try:
        results = await asyncio.gather(
            *(
                probe(channels[name], config.timeout_seconds, scrubber(config, kafka_defaults=settings.kafka))
                for name, config in configs.items()
            )
        )
    finally:
        await asyncio.gather(*(channel.close() for channel in channels.values()), return_exceptions=True)
    for (name, config), (healthy, detail) in zip(configs.items(), results, strict=True):
        verified = getattr(channels[name], "health_verifies_credentials", False)
        state = "FAILED" if not healthy else "ok" if verified else "reachable"
        print(f"  live {name} ({config.type}): {state}: {detail}")
    return 0 if all(healthy for healthy, _ in results) else 1
