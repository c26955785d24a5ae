"""How a token is picked: the batched sampler, beam search on forks, n-gram speculation. The
decoders reach the engine only through `host.EngineHost`."""
