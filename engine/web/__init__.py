"""The HTTP side of `wecast serve`: the source document's endpoints (`legacy`), the REST API (`api`), the
app factory with auth, errors, events and metrics (`app`), QR rendering (`qr`) and the server (`server`).
Nothing here is built at import time; `engine.web.app.create_app` builds an app for a given `Wecast`."""
