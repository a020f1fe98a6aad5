"""Journeys: the rule engine. Customers enter on a trigger (a new contact, a tag, a message, a date, a schedule)
and move through steps (send, wait, if, tag, goto, exit), each step's send planned through the delivery ledger
so journeys inherit every guarantee campaigns have.

    spec.py        journey YAML -> validated `Journey` (file:line:field errors)
    conditions.py  the condition language of `if:` and `exit_when:`
    events.py      customer events: the durable inbox, from the gateway stream and from the contact-sync diff
    runtime.py     entering, stepping and sending: the engine the scheduler ticks
    preview.py     the step tree, who would enter now, a contact's dry-run timeline
"""
