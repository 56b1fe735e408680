"""The engine: the only importer of ``moert._C``.

- :mod:`moert.engine.runtime`: typed wrappers of the native ``ExpertPool``, ``SlabCache``, ``CopyEngine``;
- :mod:`moert.engine.offload`: expert layout, stores, the per-model offload state and the layer forward;
- :mod:`moert.engine.prefetch`: ``PredictiveNorm`` prefetch submission (predictor -> copy engine);
- :mod:`moert.engine.hetero`: heterogeneous mode (misses computed on the host);
- :mod:`moert.engine.reference`: the reference and naive stores (test reference, benchmark baseline);
- :mod:`moert.engine.stats`: ``Stats`` / ``LayerStats``.
"""
