"""The paged-KV inference engine: block pool, prefix cache, scheduler, model runner."""
