"""A run's 群发 tasks per staff member, for the run page on a task-based gateway (wecom, the sandbox in batch mode):
how many of each member's tasks still wait for them to confirm in WeCom, and how many are done.

A task is *waiting* while any of its deliveries is still `submitted` (the member has not confirmed it, or nobody
has looked since: the page's reconcile button looks now); otherwise it is *confirmed* — its deliveries are sent,
or failed with WeCom's reason. The member of a task is the one the dispatcher sent it as: the leading staff
member of its customers (`contacts.follow_user_ids`, as the last sync left them).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import Engine

from storage import contacts as contacts_db
from storage import deliveries as deliveries_db


@dataclass(frozen=True, slots=True)
class StaffTasks:
    """One staff member's tasks in a run. `staff`: the WeCom userid ('' where no member is known)."""

    staff: str
    waiting: int  # tasks with deliveries still awaiting confirmation
    confirmed: int  # tasks with none
    customers_waiting: int  # deliveries still awaiting confirmation

    @property
    def tasks(self) -> int:
        return self.waiting + self.confirmed


def staff_tasks(db: Engine, run_id: int) -> list[StaffTasks]:
    """The run's tasks per staff member, by userid (see the module docstring)."""
    counts = deliveries_db.task_counts(db, run_id)
    if not counts:
        return []
    leads = contacts_db.follow_users(db, sorted({c.first_contact for c in counts}))
    found: dict[str, list[int]] = {}
    for task in counts:
        staff = leads.get(task.first_contact, ("",))[0]
        tally = found.setdefault(staff, [0, 0, 0])
        tally[0 if task.waiting else 1] += 1
        tally[2] += task.waiting
    return [StaffTasks(staff, *tally) for staff, tally in sorted(found.items())]
