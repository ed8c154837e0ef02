"""An OpenAI-compatible HTTP server with a web chat page, for one ``Eagle2Generator``.

``create_app(generator)`` builds the FastAPI app; ``run(generator, host, port)`` serves it with
uvicorn; ``eagle2 serve`` is the command line for it. Needs the ``serve`` extra
(fastapi, uvicorn, pydantic).
"""

from .app import create_app, run, serve_in_thread

__all__ = ["create_app", "run", "serve_in_thread"]
