"""The README's first command: `imm-router demo` routes every example through real local servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from router.decode import decode
from router.embedded.demo import demo_records


def test_demo_routes_every_example_to_every_channel(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    result = subprocess.run(
        [sys.executable, "-m", "router", "demo", "--exit", "--outbox", str(outbox)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**os.environ},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "dead letters      1 records" in result.stdout
    assert "value is not valid UTF-8" in result.stdout
    mails = list((outbox / "email").glob("*.eml"))
    robot = [json.loads(p.read_text()) for p in (outbox / "dingtalk").glob("*.json")]
    assert mails and robot
    # Every alerting example reaches the DingTalk group, alone or inside a digest.
    texts = "\n".join(json.dumps(m["message"], ensure_ascii=False) for m in robot)
    failing = []
    for _, value, headers in demo_records()[:-1]:
        event = decode(value, headers)
        if event.view["failed"] or (event.view["moderation"] or {}).get("suggestion") in ("block", "review"):
            failing.append(event.id)
    assert len(failing) == 23  # 11 EventBridge and 12 MNS examples report a failure, block or review
    missing = [event_id for event_id in failing if event_id not in texts]
    assert not missing, missing
