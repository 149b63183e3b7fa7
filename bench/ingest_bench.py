"""HTTP ingest under load: a local client process offers a fixed rate (default 2,000 requests/s for 10 s)
to one router process with its own Tansu broker, per endpoint: EventBridge (a structured CloudEvent with its
token) and MNS (signed XML pushes, the certificate from a local HTTPS server, every signature checked). The
routing stage consumes and decodes every ingested event in the same process; with --alerts a rule also turns
each into a notification on a Kafka topic. Baseline in the same run: a bare aiohttp handler in its own
process answering 204 without Kafka, driven by the same client.

The client is open loop: request i is due at start + i/rate and its latency counts from then (waiting for one
of its keep-alive connections included), so a server that falls behind shows it in the latency instead of
slowing the client down. Reported per target: offered/s, accepted (2xx)/s, other answers, p50/p99/max
latency, and the ratios to the baseline.

Run: python bench/ingest_bench.py [--rate 2000] [--seconds 10] [--alerts]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import ssl
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import trustme
from aiohttp import web

from router.embedded import free_port
from router.embedded.broker import TansuBroker
from router.embedded.mns import MnsPublisher

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token-0123456789"
CONNECTIONS = 64  # the client's keep-alive connections; a request waits for a free one
SIGNED_PUSHES = 400  # distinct MNS pushes, signed beforehand and sent in turn
EVENT = json.loads((ROOT / "tests" / "events" / "eventbridge" / "Task-AsyncTask.json").read_text())
MNS_CONTENT = (ROOT / "tests" / "events" / "mns" / "MediaConvert-Failed.json").read_text()


# --- the client (its own process) -----------------------------------------------------------------


async def client(url: str, requests_file: Path, rate: float, seconds: float) -> dict[str, Any]:
    """Raw HTTP/1.1 on CONNECTIONS keep-alive connections (aiohttp's client alone tops out below the rate)."""
    parts = urlsplit(url)
    wire = []
    for r in map(json.loads, requests_file.open()):
        body = base64.b64decode(r["body"])
        head = "".join(f"{k}: {v}\r\n" for k, v in r["headers"].items())
        wire.append(
            f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode()
            + body
        )
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    answers: Counter[str] = Counter()
    due: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        while (item := await due.get()) is not None:
            i, at = item
            try:
                writer.write(wire[i % len(wire)])
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                answers[status_line.split()[1].decode()] += 1
            except (OSError, asyncio.IncompleteReadError, IndexError) as exc:
                answers[type(exc).__name__] += 1
                writer.close()
                reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
            latencies.append(loop.time() - at)
        writer.close()

    workers = [asyncio.create_task(connection()) for _ in range(CONNECTIONS)]
    total = int(rate * seconds)
    start = loop.time() + 0.05
    for i in range(total):
        at = start + i / rate
        if at > loop.time():
            await asyncio.sleep(at - loop.time())
        due.put_nowait((i, at))
    for _ in workers:
        due.put_nowait(None)
    await asyncio.gather(*workers)
    elapsed = loop.time() - start
    latencies.sort()
    accepted = sum(n for status, n in answers.items() if status.startswith("2"))
    return {
        "offered": total / seconds,
        "accepted_per_s": accepted / elapsed,
        "answers": dict(answers),
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
        "max_ms": 1000 * latencies[-1],
    }


async def drive(url: str, requests: list[tuple[dict[str, str], bytes]], rate: float, seconds: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for headers, body in requests:
            f.write(json.dumps({"headers": headers, "body": base64.b64encode(body).decode()}) + "\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "client", url, f.name, str(rate), str(seconds), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    os.unlink(f.name)
    result: dict[str, Any] = json.loads(out)
    return result


# --- the baseline server (its own process) --------------------------------------------------------


def baseline_server(port: int) -> None:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# --- the run --------------------------------------------------------------------------------------


def router_config(
    directory: Path, bootstrap: str, port: int, publisher: MnsPublisher, ca_file: Path, alerts: bool
) -> Path:
    rules = directory / "rules"
    rules.mkdir()
    (rules / "r.yaml").write_text(
        f"rules:\n  - name: failed\n    when: \"imm.outcome == '{'failed' if alerts else 'never'}'\"\n"
        "    notify: [{channel: alerts, template: kafka/alert.json.j2}]\n"
    )
    path = directory / "router.yaml"
    doc = {
        "rules_dir": str(rules),
        "templates_dir": str(ROOT / "templates"),
        "log_level": "WARNING",
        "channels": {"alerts": {"type": "kafka", "topic": "bench-alerts"}},
        "kafka": {"bootstrap_servers": bootstrap, "topics": ["bench-events"], "group_id": "bench"},
        "service": {"dedup_ttl_seconds": 0},
        "http": {"host": "127.0.0.1", "port": port},
        "ingest": {
            "mns": {"enabled": True, "cert_url_prefixes": [publisher.prefix], "ca_file": str(ca_file)},
            "eventbridge": {"enabled": True, "token": TOKEN},
        },
    }
    path.write_text(json.dumps(doc))
    return path


async def wait_answering(url: str, request: tuple[dict[str, str], bytes], timeout: float = 60.0) -> None:
    """Until ``url`` takes ``request`` with a 2xx (the router answers 503 until Kafka is connected)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.post(url, headers=request[0], data=request[1]) as response:
                    if response.status < 300:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer 2xx within {timeout}s")
            await asyncio.sleep(0.2)


def eventbridge_requests() -> list[tuple[dict[str, str], bytes]]:
    headers = {"Content-Type": "application/cloudevents+json", "X-Imm-Router-Token": TOKEN}
    return [(headers, json.dumps(EVENT | {"id": f"bench-{i}"}).encode()) for i in range(1000)]


def mns_requests(publisher: MnsPublisher) -> list[tuple[dict[str, str], bytes]]:
    requests = []
    for i in range(SIGNED_PUSHES):
        envelope = {"id": f"mns-{i}", "source": "acs.imm", "type": "imm:Task:MediaConvert", "time": "1724133063161"}
        body = publisher.body(json.dumps(envelope | {"content": MNS_CONTENT}).encode(), "XML")
        requests.append((publisher.sign(body, "XML"), body))
    return requests


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def main(rate: float, seconds: float, alerts: bool) -> None:
    results: dict[str, dict[str, Any]] = {}
    base_port = free_port()
    baseline = await asyncio.create_subprocess_exec(sys.executable, __file__, "baseline", str(base_port))
    try:
        url = f"http://127.0.0.1:{base_port}/ingest/eventbridge"
        await wait_answering(url, eventbridge_requests()[0])
        results["baseline (bare 204)"] = await drive(url, eventbridge_requests(), rate, seconds)
    finally:
        await stop(baseline)

    ca = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(tls)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        ca_file = directory / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        async with TansuBroker(log_path=directory / "tansu.log") as broker, MnsPublisher(tls) as publisher:
            port = free_port()
            path = router_config(directory, broker.bootstrap_servers, port, publisher, ca_file, alerts)
            log = directory / "router.log"
            router = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "router", "run", "--config", str(path),
                stdout=log.open("ab"), stderr=asyncio.subprocess.STDOUT, cwd=ROOT,
            )  # fmt: skip
            try:
                for name, requests in (("eventbridge", eventbridge_requests()), ("mns", mns_requests(publisher))):
                    url = f"http://127.0.0.1:{port}/ingest/{name}"
                    await wait_answering(url, requests[0])
                    await drive(url, requests, rate / 4, 1.0)  # warm-up: connections, certificate cache
                    results[f"router /ingest/{name}"] = await drive(url, requests, rate, seconds)
            finally:
                await stop(router)
            if router.returncode != 0:
                print(log.read_text()[-3000:], file=sys.stderr)
    report(results, rate, seconds, alerts)


def report(results: dict[str, dict[str, Any]], rate: float, seconds: float, alerts: bool) -> None:
    routed = "each event also routed to a Kafka alert" if alerts else "events consumed and decoded, no alerts"
    print(
        f"\nHTTP ingest: {rate:.0f} requests/s offered for {seconds:.0f} s, open loop, one router process ({routed})\n"
    )
    print(f"{'target':<28}{'offered/s':>10}{'2xx/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}  answers")
    for name, r in results.items():
        print(
            f"{name:<28}{r['offered']:>10.0f}{r['accepted_per_s']:>10.0f}{r['p50_ms']:>9.1f}"
            f"{r['p99_ms']:>9.1f}{r['max_ms']:>9.0f}  {r['answers']}"
        )
    base = results["baseline (bare 204)"]
    for name, r in results.items():
        if r is not base:
            print(
                f"{name}: 2xx/s {r['accepted_per_s'] / base['accepted_per_s']:.2f}x the baseline, "
                f"p99 {r['p99_ms'] / base['p99_ms']:.1f}x"
            )


if __name__ == "__main__":
    if sys.argv[1:2] == ["client"]:
        url, requests_file, rate, seconds = sys.argv[2:6]
        print(json.dumps(asyncio.run(client(url, Path(requests_file), float(rate), float(seconds)))))
    elif sys.argv[1:2] == ["baseline"]:
        baseline_server(int(sys.argv[2]))
    else:
        parser = argparse.ArgumentParser()
        parser.add_argument("--rate", type=float, default=2000)
        parser.add_argument("--seconds", type=float, default=10)
        parser.add_argument("--alerts", action="store_true", help="every event also becomes a Kafka alert")
        args = parser.parse_args()
        asyncio.run(main(args.rate, args.seconds, args.alerts))
