"""The model compute both stage and draft workers run: layers, KV cache, stage runner, sampling."""
