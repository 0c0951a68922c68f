"""OpenAI-compatible HTTP server over the engine: protocol, bridge, handlers, metrics, JSON mode."""
