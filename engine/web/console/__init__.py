"""The web console of `wecast serve` (中文 by default): log the WeCom account in, find customers, check campaigns
and their previews, run them and watch them go out, read the delivery log.

Server-rendered pages (Jinja, an environment of its own: `templating`) with a little JavaScript — htmx, vendored in
`static/`, plus `static/console.js` — and no front-end build; nothing is loaded from another host. The pages use the
API's operations (`engine.web.api`), its views (`engine.views`) and its errors (`engine.web.errors`); they live
under /console (`/` leads there), and their doors are the server's: the API key (exchanged for a session cookie on
the sign-in page), the CSRF token on every change and the Host/Origin checks (`engine.web.security`,
`engine.web.sessions`).

    routes.py      the pages and the changes they make
    templating.py  the Jinja environment, interface text through gettext, time and number formats
    charts.py      the run summary's inline SVG charts
    templates/     one template per page, `_*.html` fragments that htmx swaps in
    static/        htmx.min.js (htmx 2.0.11, Zero-Clause BSD), console.js, console.css
    locale/        the interface text's gettext catalogs (console.po, compiled .mo)
"""

from __future__ import annotations

from pathlib import Path

from engine.web.console.routes import router

STATIC_DIR = Path(__file__).parent / "static"

__all__ = ["STATIC_DIR", "router"]
