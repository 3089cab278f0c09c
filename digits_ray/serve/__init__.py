"""Ray Serve: a FastAPI ingress, a batching model deployment and the drawing page (``serve_app.py`` builds it)."""
