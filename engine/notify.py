"""Run summaries for people: when a campaign's run finishes, its counts (sent, failed, skipped, unknown) go to the
staff and the group robot its `notify:` names (`engine.runsettings.RunNotify`, resolved at planning from the
campaign and config.yaml's `notify:`).

* **Staff** get an application message through WeCom's `message/send` (`WecomGateway.notify_staff`): only on the
  wecom gateway, whose app (`wecom.agent_id`) sends it.
* **A group robot** gets the text at its webhook URL (config.yaml's `notify.robot`, or the environment variable a
  campaign's `${NAME}` names): a plain HTTPS POST, on any gateway. On gateway wecom, config.yaml may name the
  robot by its key instead (`wecom.webhook_key`, `WecomGateway.notify_robot`).

A summary is sent once: by the process whose `finish_if_done` marked the run completed (an atomic update), never
for a test send. Sending it never fails the run: every problem is logged (the robot's URL never is: it carries
its key) and the run stays as it finished. The text is in config.yaml's `language:` (else the process's).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
from sqlalchemy.engine import Engine

from engine.blocking import off_loop
from engine.gateways.base import Gateway
from engine.i18n import tr, use_language
from engine.runsettings import RunNotify, RunSettings
from engine.settings import Settings
from storage import deliveries as deliveries_db
from storage import runs as runs_db
from storage.models import DeliveryStatus
from storage.runs import RunRow

if TYPE_CHECKING:  # imported where used: a process on another gateway never loads the wecom package
    from engine.gateways.wecom.gateway import WecomGateway

log = logging.getLogger("wecast.notify")
TIMEOUT = 10.0  # seconds for one robot POST
TEST_TRIGGER = "test"  # a test send's runs are never summarised


def masked(url: str) -> str:
    """A webhook URL as logs may show it: scheme, host and path, never its query (the robot's key)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _wecom(gateway: Gateway) -> WecomGateway | None:
    """The gateway as the wecom one (staff messages, its robot key), or None on any other."""
    if gateway.name != "wecom":
        return None
    from engine.gateways.wecom.gateway import WecomGateway

    return gateway if isinstance(gateway, WecomGateway) else None


def summary_text(run: RunRow, settings: RunSettings, counts: dict[DeliveryStatus, int]) -> str:
    """The summary people read, in the configured language."""
    return tr(
        "wecast: run #{run} of {name} finished: {sent} sent, {failed} failed, {skipped} skipped, {unknown} unknown",
        run=run.id,
        name=settings.name or run.campaign_id,
        sent=counts.get(DeliveryStatus.SENT, 0),
        failed=counts.get(DeliveryStatus.FAILED, 0),
        skipped=counts.get(DeliveryStatus.SKIPPED, 0),
        unknown=counts.get(DeliveryStatus.UNKNOWN, 0),
    )


class RunNotifier:
    """Sends a finished run's summary (see the module docstring). `transport`: httpx's, for tests."""

    def __init__(
        self,
        db: Engine,
        gateway: Gateway,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.db = db
        self.gateway = gateway
        self.settings = settings
        self.transport = transport

    async def run_finished(self, run_id: int) -> None:
        """Tell the run's `notify:` how it went. Never raises: problems are logged."""
        try:
            await self._notify(run_id)
        except Exception:  # a summary must never fail the run it reports
            log.exception("run %s: could not send its summary", run_id)

    async def _notify(self, run_id: int) -> None:
        run = await off_loop(runs_db.get_run, self.db, run_id)
        if run is None or run.trigger == TEST_TRIGGER:
            return
        settings = RunSettings.from_json(run.settings, run_id=run_id)
        target = settings.notify
        if target is None or not target.anyone:
            return
        counts = await off_loop(deliveries_db.status_counts, self.db, run_id)
        # config.yaml's language, not that of whoever started the run (a console page in English, say).
        with use_language(self.settings.language):
            text = summary_text(run, settings, counts)
        if target.staff:
            await self._staff(run_id, target, text)
        await self._robot(run_id, target, text)

    async def _staff(self, run_id: int, target: RunNotify, text: str) -> None:
        gateway = _wecom(self.gateway)
        if gateway is None:
            log.warning(
                "run %s: notify.staff needs gateway wecom (message/send); the %s gateway cannot tell %s",
                run_id,
                self.gateway.name,
                ", ".join(target.staff),
            )
            return
        try:
            unreached = await gateway.notify_staff(text, target.staff)
        except Exception as exc:
            log.warning("run %s: its summary did not reach staff %s: %s", run_id, ", ".join(target.staff), exc)
            return
        if unreached:
            log.warning("run %s: WeCom could not reach staff %s with its summary", run_id, ", ".join(unreached))
        else:
            log.info("run %s: summary sent to staff %s", run_id, ", ".join(target.staff))

    async def _robot(self, run_id: int, target: RunNotify, text: str) -> None:
        if target.robot_env:
            url = os.environ.get(target.robot_env, "").strip()
            if not url:
                log.warning("run %s: environment variable %s (its robot's URL) is not set", run_id, target.robot_env)
                return
            await self._post(run_id, url, text)
        elif target.config_robot and self.settings.notify.robot is not None:
            await self._post(run_id, self.settings.notify.robot.get_secret_value(), text)
        elif target.config_robot and (wecom := _wecom(self.gateway)) is not None:
            await self._gateway_robot(run_id, wecom, text)

    async def _gateway_robot(self, run_id: int, gateway: WecomGateway, text: str) -> None:
        try:
            await gateway.notify_robot(text)
        except Exception as exc:
            log.warning("run %s: the group robot (wecom.webhook_key) did not take its summary: %s", run_id, exc)
            return
        log.info("run %s: summary sent to the group robot (wecom.webhook_key)", run_id)

    async def _post(self, run_id: int, url: str, text: str) -> None:
        body = {"msgtype": "text", "text": {"content": text}}
        from engine.gateways.wecom.client import install_log_redaction

        install_log_redaction()  # httpx logs each request's URL: the robot's key= is masked there
        try:
            async with httpx.AsyncClient(transport=self.transport, timeout=TIMEOUT, trust_env=False) as client:
                answer = await client.post(url, json=body)
            data = answer.json() if answer.headers.get("content-type", "").startswith("application/json") else {}
        except (httpx.HTTPError, ValueError) as exc:
            # httpx's messages name the URL: say only what kind of failure it was.
            log.warning("run %s: the group robot %s did not answer (%s)", run_id, masked(url), type(exc).__name__)
            return
        errcode = data.get("errcode") if isinstance(data, dict) else None
        if answer.status_code != 200 or errcode != 0:
            log.warning(
                "run %s: the group robot %s refused its summary: HTTP %s, errcode %s %s",
                run_id,
                masked(url),
                answer.status_code,
                errcode,
                str(data.get("errmsg", ""))[:200] if isinstance(data, dict) else "",
            )
            return
        log.info("run %s: summary sent to the group robot %s", run_id, masked(url))
