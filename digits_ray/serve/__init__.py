"""Ray Serve: a FastAPI ingress, a batching model deployment and the drawing page; ``app.py`` is the one
entry (``serve_app.py`` at the repository root re-exports it for ``serve run``)."""
