"""Evaluators: small plug-ins over one embedded split.

`embed.embed_split` runs a model over a whole split on the mesh and returns host columns of the real rows; each
evaluator turns columns into metrics:

- `contrastive`: the tri-modal InfoNCE pair losses (pre-training's held-out loss);
- `retrieval`: R@1/5/10 and ranks in the six directions between image, text and audio;
- `zero_shot`: classification against class prompts (pre-training's evals and experiments/zero_shot.py);
- `reconstruction`: MMR's PSNR/SSIM or token metrics against input-free baselines.

Pre-training picks which run on its eval split by config (`config.evals`).
"""
