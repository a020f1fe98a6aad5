"""The child side of tests/test_wecom_token.py's two-process test: one wecast process syncing customers from the
fake WeCom over and over, its state file shared with another such process.

    WECAST_WECOM_CORP_ID=... WECAST_WECOM_SECRET=... python tests/wecom_token_runner.py BASE_URL STATE_FILE ROUNDS

Each round pages through a whole contact sync. It prints one JSON line: the customers each round listed and how
often this process called gettoken.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from engine.gateways.wecom.gateway import WecomGateway
from engine.settings import WecomSettings


async def main(base_url: str, state_file: Path, rounds: int) -> dict[str, object]:
    settings = WecomSettings.model_validate(
        {
            "corp_id": os.environ["WECAST_WECOM_CORP_ID"],
            "secret": os.environ["WECAST_WECOM_SECRET"],
            "base_url": base_url,
            "state_file": state_file,
            "retry_delay": "0.01s",
            "rate_limit_wait": "0.05s",
        }
    )
    gateway = WecomGateway(settings)
    try:
        await gateway.start()
        listed = []
        for _ in range(rounds):
            seen, cursor = 0, None
            while True:
                page = await gateway.list_contacts(cursor, 100)
                seen += len(page.contacts)
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
            listed.append(seen)
        return {"listed": listed, "gettoken": gateway.client.calls["gettoken"]}
    finally:
        await gateway.close()


if __name__ == "__main__":
    url, state, count = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(asyncio.run(main(url, state, count))), flush=True)
