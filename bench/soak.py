"""Memory under a long run: the resident set of `imm-router run` (a child process, the shipped rules
delivering to a Kafka channel, as in e2e_bench) after 100,000 events and after 1,000,000, beside each
other as a ratio (aim: within 10%). Events are the production mix (95% quiet, 5% alerting), produced in
chunks of 50,000; RSS is read once a chunk is drained. Duplicate suppression is off, as in e2e_bench:
its memory is bounded by ``dedup_max_entries`` by design, and would only measure that bound.

Run: python bench/soak.py [--events N] [--early N]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from e2e_bench import ROOT, bench_config, ensure_topic, produce, seed_values  # beside this file

from router.embedded.broker import TansuBroker

CHUNK = 50_000


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def main(events: int, early: int) -> None:
    async with TansuBroker() as broker:
        bootstrap, topic = broker.bootstrap_servers, "soak"
        await ensure_topic(bootstrap, topic, 4)
        values = seed_values(CHUNK, "production")
        with tempfile.TemporaryDirectory() as tmp:
            path = bench_config(Path(tmp), bootstrap, topic)
            group = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=f"{topic}-router", enable_auto_commit=False)
            await group.start()
            partitions = [TopicPartition(topic, p) for p in range(4)]
            router = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "router",
                "run",
                "--config",
                str(path),
                stderr=asyncio.subprocess.DEVNULL,
                cwd=ROOT,
            )
            samples: dict[int, float] = {}
            start = time.perf_counter()
            try:
                produced = 0
                while produced < events:
                    # One chunk at a time, drained before the next: RSS is read between chunks, when the
                    # router holds what it keeps, not a fetch's worth of records in flight.
                    chunk = min(CHUNK, events - produced)
                    await produce(bootstrap, topic, values[:chunk])
                    produced += chunk
                    while sum([await group.committed(tp) or 0 for tp in partitions]) < produced:
                        await asyncio.sleep(0.05)
                    if produced % early == 0:
                        samples[produced] = rss_mb(router.pid)
                        print(f"{produced:>9,} events routed: RSS {samples[produced]:.1f} MB", flush=True)
            finally:
                router.send_signal(signal.SIGTERM)
                await router.wait()
                await group.stop()
    elapsed = time.perf_counter() - start
    ratio = samples[events] / samples[early]
    print(f"{events:,} events in {elapsed:.0f} s ({events / elapsed:,.0f} ev/s)")
    print(
        f"RSS after {events:,}: {samples[events]:.1f} MB; after {early:,}: {samples[early]:.1f} MB; ratio {ratio:.3f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--early", type=int, default=100_000)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.early))
