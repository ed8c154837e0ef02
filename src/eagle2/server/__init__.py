"""An OpenAI-compatible HTTP server with a web chat page, for one ``Eagle2Generator``.

``create_app(generator, ServerConfig(...))`` builds the FastAPI app; ``run(generator, config)``
serves it with uvicorn (a generator from ``eagle2.load``); ``eagle2 serve`` is the command line for
it. Needs the ``serve`` extra (fastapi, uvicorn, pydantic); ``ServerConfig`` alone does not, so the
CLI can read its defaults.
"""

from .config import ServerConfig

__all__ = ["ServerConfig", "create_app", "run", "serve_in_thread"]


def __getattr__(name: str):
    if name in ("create_app", "run", "serve_in_thread"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
