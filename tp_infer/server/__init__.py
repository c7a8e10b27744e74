"""The OpenAI-compatible HTTP server on rank 0: the request schema, the app, its metrics, and the bridge that
hands requests to the engine's step loop."""
