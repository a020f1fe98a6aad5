"""The preview on a task-based gateway: how many 群发 tasks each staff member must confirm, grouped as the
dispatcher will group them, and a warning when personalisation turns the campaign into one task per customer."""

from __future__ import annotations

import asyncio
from pathlib import Path

from click.testing import CliRunner
from helpers import MONDAY_10, campaign

from engine.cli import main
from engine.clock import FakeClock
from engine.gateways.wecom.fake_server import FakeWecom, FakeWecomServer
from engine.gateways.wecom.gateway import WecomGateway
from engine.messages import Message
from engine.plan import Recipient, plan_tasks
from engine.service import Wecast
from engine.views import PreviewView

try:
    from test_wecom_e2e import wecom_config
    from wecom_harness import FakeWecomThread
except ImportError:  # pragma: no cover
    from tests.test_wecom_e2e import wecom_config
    from tests.wecom_harness import FakeWecomThread

POLICY = "frequency_cap: false\nquiet_hours: false\n"


def test_tasks_group_by_staff_member_and_message() -> None:
    """One task per staff member and distinct message, split at the maximum; customers without staff under ''."""
    same = Message.of_text("会员日")
    recipients = [Recipient(f"c{i}", "", "会员日", None) for i in range(5)] + [
        Recipient("c5", "", "", Message((*same.parts, *Message.of_text("x").parts))),
        Recipient("orphan", "", "会员日", None),
    ]
    follows = {"c0": ("lina",), "c1": ("lina", "zhangwei"), "c2": ("zhangwei",), "c3": ("zhangwei",), "c4": ("wu",)}
    follows["c5"] = ("lina",)
    plan = plan_tasks(recipients, follows, max_batch=1)
    assert plan.by_staff == {"": 1, "lina": 3, "wu": 1, "zhangwei": 2}
    assert plan_tasks(recipients, follows, max_batch=10_000).by_staff == {"": 1, "lina": 2, "wu": 1, "zhangwei": 1}
    assert any("no staff member" in w for w in plan.warnings())


def test_the_preview_counts_tasks_and_warns_about_personalisation(tmp_path: Path, db_url: str) -> None:
    """On the fake WeCom (200 customers, 4 staff): a plain text is one task per staff member, no warning; a text with
    the customer's name is about one task per customer, and the preview (also as JSON) says so."""
    clock = FakeClock(MONDAY_10)

    async def go() -> None:
        fake = FakeWecom(customers=200, staff=4, shared_every=5, clock=clock)
        server = FakeWecomServer(fake)
        url = await server.start()
        settings = wecom_config(tmp_path, db_url, fake, url)
        app = Wecast(settings, gateway=WecomGateway(settings.wecom, clock), clock=clock)
        await app.start()
        try:
            await app.sync()
            plain = app.preview(campaign(settings, "audience: {}\nmessage: {template: '会员日全场八折'}\n" + POLICY))
            assert plain.tasks is not None
            assert plain.tasks.by_staff == dict.fromkeys(sorted(fake.staff), 1)
            assert plain.tasks.warnings() == []
            named = app.preview(
                campaign(
                    settings, "audience: {}\nmessage: {template: '{{ name }}您好，会员日全场八折'}\n" + POLICY, "p2"
                )
            )
            assert named.tasks is not None
            assert named.tasks.total >= len(named.recipients) // 2
            [warning] = named.tasks.warnings()
            assert "one task per" in warning and str(len(named.recipients)) in warning
            view = PreviewView.from_preview(named, sample=3)
            assert view.tasks == named.tasks.by_staff
            assert view.warnings == [warning]
            assert PreviewView.from_preview(plain).warnings == []
        finally:
            await app.close()
            await server.stop()

    asyncio.run(go())


def test_wecast_preview_prints_the_tasks(tmp_path: Path) -> None:
    """`wecast preview` on gateway wecom prints the tasks per staff member."""
    fake = FakeWecom(customers=30, staff=2, shared_every=0)
    (tmp_path / "campaigns").mkdir()
    (tmp_path / "campaigns" / "plain.yaml").write_text(
        "id: plain\nname: 会员日\naudience: {}\nmessage: {template: '会员日全场八折'}\n" + POLICY, encoding="utf-8"
    )
    with FakeWecomThread(fake) as url:
        cfg = wecom_config(tmp_path, f"sqlite:///{tmp_path}/wecast.sqlite", fake, url).source
        result = CliRunner().invoke(main, ["-c", cfg, "preview", "plain"])
    assert result.exit_code == 0, result.output
    staff = ", ".join(f"{name} 1" for name in sorted(fake.staff))
    assert f"群发 tasks to confirm in WeCom: 2 ({staff})" in result.output
