"""Persistence for wecast: contacts, tags, campaign runs and deliveries (SQLModel over SQLAlchemy).

Storage never imports `engine`; the engine passes plain values in and gets rows out.
"""
