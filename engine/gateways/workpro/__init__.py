"""The `workpro` gateway: juzibot's WorkPro WeCom puppet, spoken to directly over gRPC (`wechaty.Puppet`).

    payloads.py    what the server sends, parsed: event payloads and contact payloads (pure)
    rpc_errors.py  gRPC status + details text -> the engine's error, through one table (pure)
    login.py       scan -> verify code -> login -> logout, as a state machine (pure)
    gateway.py     WorkproGateway: the channel, discovery, the event stream, the calls

Facts about the protocol come from `shared/reference/workpro_puppet.md`; the stubs are generated from
`engine/gateways/proto/puppet.proto`.
"""

from engine.gateways.workpro.gateway import WorkproGateway

__all__ = ["WorkproGateway"]
