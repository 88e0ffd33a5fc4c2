"""Times the reference's PyTorch train step on CPU, for comparison with `experiments/benchmark.py`.

Needs torch (the optional fixtures venv, see README "Numerics"); the project itself never imports it.

    .venv-torch/bin/python experiments/torch_reference_step.py --model=tiny --batch=32 --steps=20
    python experiments/benchmark.py --model=tiny --mesh=1x1 --cpu_devices=1 --batch_per_device=32 --steps=20

Towers of one's choosing take the same flags on both sides (docs/performance.md has the side-by-side runs):

    taskset -c 0 .venv-torch/bin/python experiments/torch_reference_step.py --model=base --layers=4 --width=256 \
        --heads=4 --projection=256 --batch=8 --threads=1

It rebuilds the reference's Tri_CLIP forward (docs/reference.md R1.3-1.4: CLIPVisionModel / RobertaModel / ASTModel
pooled outputs, bias-free projections, L2 normalisation, three exp-scaled logit matrices, symmetric CE, sum) from
the same tower configs as our presets, with torch.optim.AdamW(lr=5e-6) and fp32, and reports samples/s.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import transformers

from synergy_jax.models import synergy


def hf_config(config, cls):
    hf = {k: v for k, v in config.to_hf_dict().items() if k not in ("model_type", "architectures")}
    return cls(**hf)


class TriCLIP(torch.nn.Module):
    """The reference model (model.py:60-281) in its pre-training mode: returns (IT, TA, AI) losses."""

    def __init__(self, config: synergy.SynergyConfig):
        super().__init__()
        self.vision_model = transformers.CLIPVisionModel(hf_config(config.vision, transformers.CLIPVisionConfig))
        self.text_model = transformers.RobertaModel(hf_config(config.text, transformers.RobertaConfig))
        self.audio_model = transformers.ASTModel(hf_config(config.audio, transformers.ASTConfig))
        dim = config.projection_dim
        self.vision_projection = torch.nn.Linear(config.vision.hidden_size, dim, bias=False)
        self.text_projection = torch.nn.Linear(config.text.hidden_size, dim, bias=False)
        self.audio_projection = torch.nn.Linear(config.audio.hidden_size, dim, bias=False)
        self.logit_scales = torch.nn.Parameter(torch.full((3,), synergy.LOGIT_SCALE_INIT))

    @staticmethod
    def clip_loss(logits: torch.Tensor) -> torch.Tensor:
        labels = torch.arange(logits.shape[0])
        ce = torch.nn.functional.cross_entropy
        return 0.5 * (ce(logits, labels) + ce(logits.T, labels))

    def forward(self, images, input_ids, attention_mask, audio):
        def normalise(x):
            return x / x.norm(dim=-1, keepdim=True)

        image = normalise(self.vision_projection(self.vision_model(pixel_values=images).pooler_output))
        text = normalise(self.text_projection(self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output))
        sound = normalise(self.audio_projection(self.audio_model(input_values=audio).pooler_output))
        it, ta, ai = self.logit_scales.exp()
        return self.clip_loss(it * image @ text.T) + self.clip_loss(ta * text @ sound.T) + self.clip_loss(ai * sound @ image.T)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=sorted(synergy.PRESETS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--text_length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--layers", type=int, default=0, help="encoder layers of every tower (0: the preset's)")
    parser.add_argument("--width", type=int, default=0, help="hidden width of every tower, MLP at 4x (0: the preset's)")
    parser.add_argument("--heads", type=int, default=0, help="attention heads of every tower (0: the preset's)")
    parser.add_argument("--projection", type=int, default=0, help="projection width (0: the preset's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = synergy.resized(synergy.preset_config(args.model), args.layers, args.width, args.heads, args.projection)
    model = TriCLIP(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-6)
    rng = np.random.default_rng(0)
    v, a = config.vision, config.audio
    images = torch.from_numpy(rng.normal(size=(args.batch, v.num_channels, v.image_size, v.image_size)).astype(np.float32))
    ids = torch.from_numpy(rng.integers(3, config.text.vocab_size, (args.batch, args.text_length)))
    mask = torch.ones_like(ids)
    audio = torch.from_numpy(rng.normal(size=(args.batch, a.max_length, a.num_mel_bins)).astype(np.float32))

    def step() -> float:
        loss = model(images, ids, mask, audio)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return float(loss)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    seconds = (time.perf_counter() - start) / args.steps
    print(f"torch {torch.__version__} threads={torch.get_num_threads()} model={args.model} batch={args.batch}")
    print(f"step time   {seconds * 1e3:10.1f} ms  (mean of {args.steps}, after 1 warm-up)")
    print(f"throughput  {args.batch / seconds:10.1f} samples/s")
    print(f"loss        {loss:10.4f}")


if __name__ == "__main__":
    main()
