"""The web console every manager serves (see docs/CONSOLE.md).

* :mod:`manager.console.auth`     the token file, the auth/headers ASGI guard (no web framework)
* :mod:`manager.console.backend`  what the pages show, asked over the bus
* :mod:`manager.console.app`      the starlette application: pages and the JSON API

The ``console`` service (:mod:`services.console`) runs it with uvicorn in its event loop.
"""
