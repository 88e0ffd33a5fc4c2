"""Times the reference's PyTorch train step on CPU, for comparison with `experiments/benchmark.py`.

Needs torch (the optional fixtures venv, see README "Numerics"); the project itself never imports it.

    .venv-torch/bin/python experiments/torch_reference_step.py --model=tiny --batch=32 --steps=20
    python experiments/benchmark.py --model=tiny --mesh=1x1 --cpu_devices=1 --batch_per_device=32 --steps=20

Towers of one's choosing take the same flags on both sides (docs/performance.md has the side-by-side runs):

    taskset -c 0 .venv-torch/bin/python experiments/torch_reference_step.py --model=base --layers=4 --width=256 \
        --heads=4 --projection=256 --batch=8 --threads=1

In the reference's own pinned environment (torch 2.0.1, transformers 4.39.2, numpy 1.x: docs/reference.md, first
paragraph), which cannot hold JAX, the towers come from a file that the project's venv writes:

    python experiments/torch_reference_step.py --model=base --layers=4 ... --write_configs=/tmp/towers.json
    python3 -m venv .venv-reference && .venv-reference/bin/pip install torch==2.0.1 transformers==4.39.2 'numpy<2'
    taskset -c 0 .venv-reference/bin/python experiments/torch_reference_step.py --configs=/tmp/towers.json \
        --batch=8 --threads=1

It rebuilds the reference's Tri_CLIP forward (docs/reference.md R1.3-1.4: CLIPVisionModel / RobertaModel / ASTModel
pooled outputs, bias-free projections, L2 normalisation, three exp-scaled logit matrices, symmetric CE, sum) from
the same tower configs as our presets, with torch.optim.AdamW(lr=5e-6) and fp32, and reports samples/s.

Attention is eager by default, as the reference ran it: its transformers 4.39.2 had no SDPA path for CLIP, RoBERTa
or AST (transformers added them in May-July 2024). `--attention=sdpa` times torch's fused
`scaled_dot_product_attention` instead, the default of the transformers that `.venv-torch` installs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def tower_configs(args: argparse.Namespace) -> dict:
    """The three towers' Hugging Face config dicts, the projection width and the logit scales' initial value: read
    from `--configs`, or made from our presets (which needs the project's venv)."""
    if args.configs:
        return json.loads(Path(args.configs).read_text())
    from synergy_jax.models import synergy

    config = synergy.resized(synergy.preset_config(args.model), args.layers, args.width, args.heads, args.projection)
    return {
        "vision": config.vision.to_hf_dict(),
        "text": config.text.to_hf_dict(),
        "audio": config.audio.to_hf_dict(),
        "projection_dim": config.projection_dim,
        "logit_scale_init": synergy.LOGIT_SCALE_INIT,
    }


def tri_clip(towers: dict, attention: str):
    """The reference model (model.py:60-281) in its pre-training mode: returns IT + TA + AI losses."""
    import torch
    import transformers

    def tower(name: str, model_cls, config_cls):
        fields = {k: v for k, v in towers[name].items() if k not in ("model_type", "architectures")}
        return model_cls(config_cls(**fields, attn_implementation=attention))

    def clip_loss(logits: torch.Tensor) -> torch.Tensor:
        labels = torch.arange(logits.shape[0])
        ce = torch.nn.functional.cross_entropy
        return 0.5 * (ce(logits, labels) + ce(logits.T, labels))

    def normalise(x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=-1, keepdim=True)

    class TriCLIP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_model = tower("vision", transformers.CLIPVisionModel, transformers.CLIPVisionConfig)
            self.text_model = tower("text", transformers.RobertaModel, transformers.RobertaConfig)
            self.audio_model = tower("audio", transformers.ASTModel, transformers.ASTConfig)
            width = towers["projection_dim"]
            self.vision_projection = torch.nn.Linear(towers["vision"]["hidden_size"], width, bias=False)
            self.text_projection = torch.nn.Linear(towers["text"]["hidden_size"], width, bias=False)
            self.audio_projection = torch.nn.Linear(towers["audio"]["hidden_size"], width, bias=False)
            self.logit_scales = torch.nn.Parameter(torch.full((3,), towers["logit_scale_init"]))

        def forward(self, images, input_ids, attention_mask, audio):
            image = normalise(self.vision_projection(self.vision_model(pixel_values=images).pooler_output))
            text_out = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
            text = normalise(self.text_projection(text_out))
            sound = normalise(self.audio_projection(self.audio_model(input_values=audio).pooler_output))
            it, ta, ai = self.logit_scales.exp()
            return clip_loss(it * image @ text.T) + clip_loss(ta * text @ sound.T) + clip_loss(ai * sound @ image.T)

    return TriCLIP()


def random_batch(towers: dict, batch: int, text_length: int) -> tuple:
    import torch

    rng = np.random.default_rng(0)
    v, t, a = towers["vision"], towers["text"], towers["audio"]
    images = rng.normal(size=(batch, v.get("num_channels", 3), v["image_size"], v["image_size"])).astype(np.float32)
    ids = torch.from_numpy(rng.integers(3, t["vocab_size"], (batch, text_length)))
    audio = rng.normal(size=(batch, a["max_length"], a["num_mel_bins"])).astype(np.float32)
    return torch.from_numpy(images), ids, torch.ones_like(ids), torch.from_numpy(audio)


def time_steps(towers: dict, args: argparse.Namespace) -> None:
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    model = tri_clip(towers, args.attention).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-6)
    batch = random_batch(towers, args.batch, args.text_length)

    def step() -> float:
        loss = model(*batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return float(loss.detach())

    for _ in range(args.warmup):
        step()
    each = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        each.append(time.perf_counter() - start)
    seconds = float(np.median(each))
    print(f"torch {torch.__version__} transformers {transformers.__version__} threads={torch.get_num_threads()} "
          f"batch={args.batch} attention={model.audio_model.config._attn_implementation}")
    print(f"parameters  {sum(p.numel() for p in model.parameters() if p.requires_grad)}")
    print(f"step time   {seconds * 1e3:10.1f} ms  (median of {args.steps} after {args.warmup} warm-up; "
          f"mean {np.mean(each) * 1e3:.1f} ms)")
    print(f"throughput  {args.batch / seconds:10.1f} samples/s")
    print(f"loss        {loss:10.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="Synergy preset: tiny, base or large")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--text_length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (as experiments/benchmark.py)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--layers", type=int, default=0, help="encoder layers of every tower (0: the preset's)")
    parser.add_argument("--width", type=int, default=0, help="hidden width of every tower, MLP at 4x (0: the preset's)")
    parser.add_argument("--heads", type=int, default=0, help="attention heads of every tower (0: the preset's)")
    parser.add_argument("--projection", type=int, default=0, help="projection width (0: the preset's)")
    parser.add_argument("--attention", default="eager", choices=["eager", "sdpa"],
                        help="the towers' attention: eager (what the reference ran) or sdpa (torch's fused kernel)")
    parser.add_argument("--configs", help="read the towers from this file (written by --write_configs) instead of "
                        "from the presets: for a venv without JAX")
    parser.add_argument("--write_configs", help="write the towers the flags describe to this file and stop")
    args = parser.parse_args()
    towers = tower_configs(args)
    if args.write_configs:
        Path(args.write_configs).write_text(json.dumps(towers, indent=1))
        print(f"wrote the tower configs to {args.write_configs}")
        return
    time_steps(towers, args)


if __name__ == "__main__":
    main()
