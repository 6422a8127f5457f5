"""Applications over the library: the demo, the `adakv` command line, the embedded default model."""
