"""Realistic Chinese demo customers for the sandbox, generated deterministically from a seed.

`demo_contacts(n, seed)` gives the same `n` customers for the same seed, at any size (benchmarks ask for
100,000). A few are coworkers or no longer friends, some lack a city or phone, and one has template
syntax in its remark, so previews show what real data looks like.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from engine.gateways.base import ContactRecord, TagRecord

SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤"
GIVEN = "伟 芳 娜 秀英 敏 静 丽 强 磊 军 洋 勇 艳 杰 娟 涛 明 超 秀兰 霞 平 刚 桂英 婷 雪 琳 晨 欣怡 子涵 梓萱 浩然 宇轩 思雨 佳怡 一诺 雨桐 可馨 俊杰 晓燕 海燕 春梅 文博 嘉怡 诗涵 雅琪 梦瑶 子轩 晓明 建华".split()
NICK = "小鹿 阿紫 Momo 安安 糖糖 大橙子 Lily 晴天 小雨 木木 Coco 阿杰 豆豆 向日葵 Vivian 七七 柠檬 Ada 小米粒 Kevin 慢慢 一一".split()
# Names that say whether their bearer is a man or a woman (the rest could be either): a customer's name and gender
# agree, so no 浩然 is greeted 女士.
MALE_NAMES = frozenset("伟 强 磊 军 洋 勇 杰 涛 明 超 刚 浩然 宇轩 俊杰 文博 子轩 晓明 建华 阿杰 Kevin".split())
FEMALE_NAMES = frozenset(
    "芳 娜 秀英 敏 静 丽 艳 娟 秀兰 霞 桂英 婷 雪 琳 欣怡 子涵 梓萱 思雨 佳怡 雨桐 可馨 晓燕 海燕 春梅 嘉怡 诗涵 雅琪 梦瑶 "
    "阿紫 Momo 糖糖 Lily Coco Vivian Ada".split()
)
CITIES: list[tuple[str, str, int]] = [  # (province, city, weight)
    ("上海", "上海", 18),
    ("北京", "北京", 14),
    ("浙江", "杭州", 12),
    ("广东", "广州", 10),
    ("广东", "深圳", 11),
    ("江苏", "南京", 7),
    ("江苏", "苏州", 7),
    ("四川", "成都", 8),
    ("湖北", "武汉", 6),
    ("陕西", "西安", 4),
    ("重庆", "重庆", 5),
    ("天津", "天津", 3),
    ("福建", "厦门", 3),
    ("湖南", "长沙", 4),
    ("山东", "青岛", 3),
]
TAGS: list[TagRecord] = [
    TagRecord("tag-vip", "VIP", "客户等级", 2),
    TagRecord("tag-member", "普通会员", "客户等级", 2),
    TagRecord("tag-new", "新客", "客户等级", 2),
    TagRecord("tag-skincare", "护肤", "兴趣偏好", 2),
    TagRecord("tag-makeup", "彩妆", "兴趣偏好", 2),
    TagRecord("tag-baby", "母婴", "兴趣偏好", 2),
    TagRecord("tag-sport", "运动", "兴趣偏好", 2),
    TagRecord("tag-store-sh", "上海徐汇店", "所属门店", 2),
    TagRecord("tag-store-hz", "杭州湖滨店", "所属门店", 2),
    TagRecord("tag-store-sz", "深圳万象城店", "所属门店", 2),
    TagRecord("tag-birthday-12", "12月生日", "生日月份", 2),
    TagRecord("tag-nodisturb", "勿扰", "营销偏好", 2),
    TagRecord("tag-followup", "待回访", "个人标签", 1),
]
TITLES = ["", "", "", "设计师", "教师", "产品经理", "护士", "销售经理", "工程师", "财务", "自由职业", "学生"]
CORPS = ["", "", "", "", "腾讯", "阿里巴巴", "字节跳动", "招商银行", "华为", "美团", "小红书", "某某贸易有限公司"]
SIGNATURES = ["", "", "", "生活明朗，万物可爱", "热爱运动", "慢慢来，比较快", "保持好奇", "今天也要加油鸭"]
CORP_ID = "ww7d3f2a9c61b5e0a4"
# Anchor date for "added" times, so the same seed gives the same customers whatever today is.
EPOCH = datetime(2026, 11, 1, tzinfo=UTC)


def _agreeing(name: str, gender: int, pool: list[str], index: int) -> str:
    """`name`, or (when it says the other gender) a name from `pool` that fits `gender`, chosen by `index` — no
    extra random draw, so everything else about the seed's customers stays as it was."""
    wrong = MALE_NAMES if gender == 2 else FEMALE_NAMES if gender == 1 else frozenset()
    if name not in wrong:
        return name
    fitting = [n for n in pool if n not in wrong]
    return fitting[index % len(fitting)]


def demo_tags() -> list[TagRecord]:
    return list(TAGS)


def demo_contacts(n: int, seed: int = 2024, *, now: datetime | None = None) -> list[ContactRecord]:
    """`n` deterministic demo customers. `now` shifts the 'added' dates so some are always recent."""
    return list(iter_demo_contacts(n, seed, now=now))


def iter_demo_contacts(n: int, seed: int = 2024, *, now: datetime | None = None) -> Iterator[ContactRecord]:
    """`demo_contacts`, one at a time (a benchmark's million customers are never held at once)."""
    rng = random.Random(seed)
    anchor = now or EPOCH
    cities = [(p, c) for p, c, w in CITIES for _ in range(w)]
    for i in range(n):
        surname = SURNAMES[rng.randrange(len(SURNAMES))]
        given = GIVEN[rng.randrange(len(GIVEN))]
        real = surname + given
        gender = rng.choice((1, 2, 2, 2, 0))  # a beauty retailer's customers: mostly women
        given = _agreeing(given, gender, GIVEN, i)
        real = surname + given
        name = _agreeing(rng.choice(NICK), gender, NICK, i) if rng.random() < 0.3 else real
        province, city = cities[rng.randrange(len(cities))]
        if rng.random() < 0.06:
            province, city = "", ""  # some customers never filled in their city
        level = rng.random()
        tag_ids = ["tag-vip" if level < 0.15 else "tag-member" if level < 0.75 else "tag-new"]
        for tag in ("tag-skincare", "tag-makeup", "tag-baby", "tag-sport"):
            if rng.random() < 0.25:
                tag_ids.append(tag)
        store = {"上海": "tag-store-sh", "杭州": "tag-store-hz", "深圳": "tag-store-sz"}.get(city)
        if store and rng.random() < 0.7:
            tag_ids.append(store)
        if rng.random() < 0.08:
            tag_ids.append("tag-birthday-12")
        if rng.random() < 0.03:
            tag_ids.append("tag-nodisturb")
        if rng.random() < 0.05:
            tag_ids.append("tag-followup")
        added = anchor - timedelta(days=rng.random() ** 1.6 * 720, minutes=rng.randrange(1440))
        alias = real if rng.random() < 0.5 else ""  # the remark staff gave the customer
        phone = f"1{rng.choice('3578')}{rng.randrange(10**9):09d}" if rng.random() < 0.8 else ""
        coworker = rng.random() < 0.02
        friend = not coworker and rng.random() > 0.03
        contact_id = f"7881{(seed * 1_000_003 + i * 7919) % 10**12:012d}"
        record = ContactRecord(
            id=contact_id,
            name=name,
            alias=alias,
            avatar=f"https://wework.qpic.cn/wwhead/demo{i % 97:02d}/0",
            gender=gender,
            city=city,
            province=province,
            address=f"{city}市{rng.choice('东西南北中')}区{rng.randrange(1, 999)}号"
            if city and rng.random() < 0.3
            else "",
            corporation=rng.choice(CORPS),
            title=rng.choice(TITLES),
            phones=(phone,) if phone else (),
            weixin=f"wxid_{rng.randrange(16**10):010x}",
            description="",
            signature=rng.choice(SIGNATURES),
            friend=friend,
            coworker=coworker,
            star=rng.random() < 0.05,
            type=3 if coworker else 1,
            real_name=real if coworker else "",
            aka="",
            additional_info={"addContactTime": int(added.timestamp() * 1000), "corpId": CORP_ID},
            corp_id=CORP_ID,
            added_at=added,
            tag_ids=tuple(tag_ids),
        )
        if i == 7 and n >= 10:
            # Customer data is data: a remark that looks like a template must reach the message as typed.
            record = ContactRecord(**{**record.__dict__, "alias": "{{ 7*7 }}号顾客", "name": "小七{{name}}"})
        yield record
