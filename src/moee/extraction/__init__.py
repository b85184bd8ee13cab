"""The extraction stages, in pipeline order (`moee.extract` runs them; api.py):

1. `record`        every MLP block's inputs and hidden activations on calibration tokens
2. `cluster`       per layer, clusters of the hidden activations (`cluster_cache` keeps them)
3. `select`        each cluster's neurons: an expert (`carve`: the neuron-group baselines;
                   `top_k`: each token's k best experts as one)
4. `reproduce`     the experts fitted to the dense layer's output: `router_fit` (which expert
                   serves a token best), `down_refit` (least squares), `output_error`
   `fit`           one layer's clustering and statistics, turned into a plan at any p
   `budget`        the p of each layer that meets a MAC target (MAC-budget mode)
5. build           the plans installed as MoE layers: `moee.moe_build`, beside the MoE
                   layer, since loading a checkpoint builds its layers the same way
6. `local_distill` each MoE layer trained toward its dense layer (optional)

The stages never import `moee.training` (the budget's sensitivity uses `moee.losses`) nor
the layers above them: export, the API, the CLI (pyproject.toml's import contracts).
"""
