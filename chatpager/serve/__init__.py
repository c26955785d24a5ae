"""`chatpager serve`: an OpenAI-compatible HTTP host on the paged engine.

protocol (the wire format) · app (routes) · serving_chat / serving_completions (requests to
engine requests and back) · bridge (asyncio <-> the EngineLoop) · auth (tenants and
keys) · errors (OpenAI's error shape) · metrics (Prometheus) · server (uvicorn, in the
foreground or on a thread) · cli (the command line).
"""
