"""What `wecast init` writes into a new folder: a starter config.yaml (the sandbox gateway, so it works at once),
campaigns/ with one example in Chinese, and data/ for the database. Nothing is overwritten."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.errors import WecastError
from engine.i18n import tr

CONFIG = """\
# wecast 配置 / configuration. 只有 version 是必填的；写错的键会报错（指出文件、行号和字段）。
# Only `version` is required; an unknown key is an error naming file, line and field.
# 密钥不要写在这里 / secrets go in the environment: WECAST_API_KEY, WECAST_WORKPRO_TOKEN, WECAST_WECOM_SECRET.
version: 1

language: zh_CN                  # zh_CN（中文）| en；命令行 --lang 优先 / --lang overrides it
gateway: sandbox                 # sandbox（本机模拟账号，不会真的发出消息）| workpro | wecom
timezone: Asia/Shanghai
database_url: sqlite:///data/wecast.sqlite
campaigns_dir: campaigns

sending:
  frequency_cap: {max: 1, per: day}           # 每个客户每天最多 1 条营销消息（所有活动合计）
  quiet_hours: {start: "21:00", end: "09:00"} # 免打扰时段：这段时间不发送，等到 09:00

sandbox:
  contacts: 200                  # 模拟客户数量 / demo customers
  state_file: data/sandbox.sqlite
"""

CAMPAIGN = """\
# 示例活动：给最近 30 天新添加的客户发一条欢迎消息。先预览：wecast preview welcome
# An example campaign. Preview it first: wecast preview welcome
id: welcome
name: 新客欢迎
description: 给最近 30 天添加的客户发一条欢迎消息（勿扰标签的客户不发）。
audience:
  rules:
    - added_within: 30d          # 30 天内添加的客户
  tags_none: [勿扰]
message:
  template: |
    {{ display_name }}{{ honorific | default("") }}您好，欢迎关注我们！
    {% if city is defined %}{{ city }}门店{% else %}各门店{% endif %}新客到店可领取小样一份。回复TD退订。
  on_missing_field: error        # 缺少模板用到的字段时报错（skip：跳过这些客户）
dedupe: once                     # 每个客户只发一次
quiet_hours: {start: "21:00", end: "09:00"}
throttle: {per_second: 5}
"""


@dataclass(frozen=True)
class Created:
    folder: Path
    files: list[Path]


def init_folder(folder: Path) -> Created:
    """Write the starter files into `folder` (created if needed). Refuses, before writing anything, when a
    config.yaml or the example campaign is already there."""
    config = folder / "config.yaml"
    campaign = folder / "campaigns" / "welcome.yaml"
    taken = [p for p in (config, campaign) if p.exists()]
    if taken:
        raise WecastError(
            tr("{path} already exists; wecast init never overwrites a file (choose another folder)", path=taken[0])
        )
    (folder / "campaigns").mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    config.write_text(CONFIG, encoding="utf-8")
    campaign.write_text(CAMPAIGN, encoding="utf-8")
    return Created(folder, [config, campaign, folder / "data"])
