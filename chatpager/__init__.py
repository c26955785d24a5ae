"""chatpager: many concurrent LLM chats over one PagedAttention KV cache."""
from chatpager.engine.sampling_params import BeamSearchParams, SamplingParams


def __getattr__(name: str):
    # LLM pulls in torch (seconds): import it only when asked for
    if name == "LLM":
        from chatpager.engine.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "BeamSearchParams"]
