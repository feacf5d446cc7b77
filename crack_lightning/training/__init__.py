"""The training recipe: run folders, callbacks, the two-stage recipe, feature caching and WiSE-FT."""
