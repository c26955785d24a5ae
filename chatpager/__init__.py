"""chatpager: many concurrent LLM chats over one PagedAttention KV cache."""
from chatpager.engine.sampling_params import SamplingParams


def __getattr__(name: str):
    # LLM pulls in torch (seconds): import it only when asked for
    if name == "LLM":
        from chatpager.engine.llm import LLM

        return LLM
    if name == "BeamSearchParams":
        from chatpager.engine.beam_search import BeamSearchParams

        return BeamSearchParams
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "BeamSearchParams"]
