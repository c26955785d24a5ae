"""How front ends talk to the engine: the EngineLoop client, the core that owns the LLM (on a
thread or in its own process), and the picklable commands and events between them."""
