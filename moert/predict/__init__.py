"""Expert predictors: training, evaluation and files (DESIGN §5).

| module | what |
|---|---|
| ``base`` | ``Predictor`` interface (``predict(layer, seq) -> (T, E)``), ``PredictorMeta`` header, compatibility checks |
| ``preattn`` | per-layer MLP on the pre-attention row (``linear2``, ``mlp_bn`` with BatchNorm folding), lookahead |
| ``moe_beyond`` | MoE-Beyond causal transformer encoder over tokens + layer embedding |
| ``xlayer`` | cheap cross-layer predictor (experts at l-1, l-2, token, position, previous token) |
| ``baselines`` | ``prev-token``, ``frequency``, ``next-gate`` |
| ``losses`` / ``metrics`` | mse, wbce, focal, rank / exact match, over-provision hit, top-1, recall, precision, F1 |
| ``data`` / ``train`` / ``evaluate`` | datasets and splits by sequence / seeded early-stopped loop / metrics over a trace |
| ``io`` | safetensors + JSON header files (never pickle) |
| ``prefetch`` | any predictor as a simulator prefetch hook (``--prefetch PRED.safetensors[:m]``) |
| ``train_cli`` / ``eval_cli`` | ``moert train`` / ``moert eval`` |

Nothing is imported here, so ``import moert.predict`` stays cheap.
"""
