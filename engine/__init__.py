"""wecast: scheduled, rule-driven WeCom customer messaging.

Layers (imports point downwards only):

    cli / web            the command line and the HTTP service
      -> dispatch        plan -> claim -> throttle -> send -> record
        -> audience, render, spec, settings
        -> gateways      how to reach WeCom (sandbox, workpro, wecom)
        -> storage       the database (never imports engine)
"""

__version__ = "0.1.0"
