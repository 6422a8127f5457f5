"""Runtimes run presses inside an inference engine. `hf/`: transformers (hooks on the attention layers,
whole and chunked prefill, compression during decoding, CUDA graphs and fusions). A runtime builds each
layer's `PrefillContext`, asks the press for a keep mask and hands it to the cache."""
