"""The paged-KV inference engine. Folders, imports pointing down (docs/ARCHITECTURE.md):
loop/ (front ends) -> llm -> llm_engine -> decoding/ | processors and stats -> model/ -> core/,
over the plain records config, outputs, sampling_params and detokenizer."""
