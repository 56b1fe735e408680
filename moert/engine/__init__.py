"""The engine: the only importer of ``moert._C``.

- :mod:`moert.engine.runtime`: typed wrappers of the native ``SlabCache``, ``CopyEngine``;
- :mod:`moert.engine.pool`: the native ``ExpertPool``'s wrapper;
- :mod:`moert.engine.devices`: the extension's loader, ``backends``, device names, the ``"sim"`` device model;
- :mod:`moert.engine.native_args`: how torch / numpy values cross into them (ids, arrays, memory views);
- :mod:`moert.engine.layout`: one expert's slab layout and its math (``expert_forward``);
- :mod:`moert.engine.offloader`: the ``Offloader``, one per patched model (pool, cache, copy engine, slot
  views; acquire / wait / release / prefetch / apply(plan) / stats);
- :mod:`moert.engine.layer`: the layer forward (route -> policy -> waves -> compute -> reduce);
- :mod:`moert.engine.prefetch`: ``PredictiveNorm`` prefetch submission (predictor -> copy engine);
- :mod:`moert.engine.hetero`: heterogeneous mode (misses computed on the host);
- :mod:`moert.engine.reference`: the reference and naive stores (test reference, benchmark baseline);
- :mod:`moert.engine.stats`: ``Stats`` / ``LayerStats``.
"""
