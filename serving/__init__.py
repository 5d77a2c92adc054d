"""The OpenAI-compatible server (needs the `server` extra). Not a hub file.

- app.py: routes, SSE framing, the `serve` command line
- engine.py: the worker thread that owns the model and runs continuous batching
- requests.py: reading requests into generation jobs; the voice store
- schemas.py: settings, errors, request schemas, audio encodings
"""
