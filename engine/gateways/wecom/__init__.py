"""The `wecom` gateway: WeCom's official server API (issue 12).

    gateway.py      WecomGateway: the contract on top of the pieces below
    client.py       httpx calls: the access token, errcodes, retries, the limiter
    errors.py       the one table from errcodes to the engine's error kinds
    limiter.py      per-API call windows and concurrency, provably under WeCom's limits
    customers.py    customers and corp tags -> ContactRecord / TagRecord (follows merged)
    store.py        the gateway's state file: the 群发 task ledger, media ids, contact sync snapshots
    crypto.py       WXBizMsgCrypt: callback signatures and AES-256-CBC
    callbacks.py    the callback URL check and change_external_contact events
    fake_server.py  a fake WeCom server (FastAPI on loopback) for tests and demos:
                    `python -m engine.gateways.wecom.fake_server`

Nothing here imports httpx or cryptography until the gateway is built (`engine.gateways.registry` imports lazily).
"""
