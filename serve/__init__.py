"""``moevl serve``: an OpenAI-compatible server with continuous batching (app.py, scheduler.py, protocol.py,
metrics.py) and its Ray Serve deployment (ray_app.py). Needs the ``serve`` extra (``ray`` for Ray Serve)."""
