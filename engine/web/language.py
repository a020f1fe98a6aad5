"""Every HTTP answer in the request's language: the API's and the source document's endpoints pick it per request
(`?lang=zh|en`, then Accept-Language, then config.yaml's `language:`, then the server's own language, the one
`wecast --lang` or its locale gives it: a `wecast serve` started in a zh_CN locale answers curl in Chinese, as the
source document's service did; English when nothing says otherwise), run the whole request under
`engine.i18n.use_language`, and say which it was in `Content-Language`. The console picks its own (its cookie,
Chinese by default: `engine.web.console.templating`) inside this. Only the words change: JSON keys and machine
codes (`code`, `state`, `reason_code`) stay English."""

from __future__ import annotations

from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.i18n import Language, current, negotiate, use_language


def request_language(query_lang: str | None, accept_language: str | None, config: Language | None) -> Language:
    """The language of an API answer (see the module docstring); an unknown `?lang=` is ignored, not an error. Called
    outside any request's language, so `current()` is the process's (English unless the CLI set another)."""
    lang = Language.parse(query_lang) if query_lang else None
    return lang or negotiate(accept_language) or config or current()


class SpeakLanguage:
    """ASGI middleware: the request runs in its language (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, config: Language | None) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw: bytes = scope.get("query_string", b"")
        given = parse_qs(raw.decode("latin-1")).get("lang") if b"lang=" in raw else None
        asked = given[0] if given else None
        # ASGI servers give header names in lower case.
        accept = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"accept-language"), None)
        lang = request_language(asked, accept, self.config)

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"content-language" for k, _ in headers):
                    headers.append((b"content-language", lang.tag.encode()))
                message = {**message, "headers": headers}
            await send(message)

        with use_language(lang):
            await self.app(scope, receive, tagged)
