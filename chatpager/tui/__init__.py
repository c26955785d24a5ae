"""The chatpager terminal UI: many chat sessions on one engine, and its paged KV cache."""
