"""The one place gateway names map to classes. Config says `gateway: workpro`; nothing scans folders.

Imports are lazy so the sandbox needs neither grpc nor the wecom gateway's httpx and cryptography loaded.
"""

from __future__ import annotations

from engine.clock import Clock
from engine.errors import ConfigError
from engine.gateways.base import Capabilities, Gateway
from engine.i18n import tr
from engine.settings import Settings

GATEWAYS = ("sandbox", "workpro", "wecom")


def build_gateway(settings: Settings, clock: Clock | None = None) -> Gateway:
    """A new, not yet started gateway of the kind `settings.gateway` names."""
    name = settings.gateway
    if name == "sandbox":
        from engine.gateways.sandbox import SandboxGateway

        return SandboxGateway(settings.sandbox, clock)
    if name == "workpro":
        from engine.gateways.workpro import WorkproGateway

        if settings.workpro.token is None:
            raise ConfigError(tr("gateway workpro needs a token: set WECAST_WORKPRO_TOKEN or workpro.token"))
        return WorkproGateway(settings.workpro, clock)
    if name == "wecom":
        from engine.gateways.wecom.gateway import WecomGateway

        if settings.wecom.corp_id is None or settings.wecom.secret is None:
            raise ConfigError(
                tr(
                    "gateway wecom needs the corp id and the app secret: set WECAST_WECOM_CORP_ID and "
                    "WECAST_WECOM_SECRET (or wecom.corp_id / wecom.secret as ${ENV} references)"
                )
            )
        return WecomGateway(settings.wecom, clock)
    raise ConfigError(tr("unknown gateway {name!r}; choose one of {names}", name=name, names=", ".join(GATEWAYS)))


def gateway_capabilities(settings: Settings) -> Capabilities:
    """What the gateway `settings.gateway` names can do, without building it (validation asks which message parts
    it can send)."""
    name = settings.gateway
    if name == "sandbox":
        from engine.gateways.sandbox import SandboxGateway

        return SandboxGateway.capabilities_for(settings)
    if name == "workpro":
        from engine.gateways.workpro import WorkproGateway

        return WorkproGateway.capabilities_for(settings)
    if name == "wecom":
        from engine.gateways.wecom.gateway import WecomGateway

        return WecomGateway.capabilities_for(settings)
    raise ConfigError(tr("unknown gateway {name!r}; choose one of {names}", name=name, names=", ".join(GATEWAYS)))
