"""Train enginekit's built-in default model: a tiny timm ViT on scikit-learn's digits.

Seeded and deterministic on CPU: the same seed, epochs and library versions give
the same ``model.safetensors``, byte for byte. Needs ``enginekit[export,data]``::

    python scripts/train_default_model.py                  # -> enginekit/models/digits-vit
    python scripts/train_default_model.py --out /tmp/dv --epochs 2

Steps: 1. split the data; 2. build the model and its preprocessing; 3. push every
image through timm's own eval transform once (plus ±1 pixel shifts of the 8x8
image for training); 4. train with AdamW and a cosine schedule; 5. measure the
held-out accuracy with the plain eval transform; 6. save in timm's hub format,
reload it and check the logits; 7. write the model card.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from tqdm import tqdm

from enginekit.artifact import atomic_folder, sha256_file
from enginekit.models.digits import LABELS, SPLIT_SEED, TEST_FRACTION, digits_split

ARCHITECTURE = "vit_tiny_patch16_224"
# The create_model kwargs, saved as config.json's model_args so
# `timm.create_model("local-dir:<folder>", pretrained=True)` rebuilds the same net.
MODEL_ARGS = {
    "num_classes": len(LABELS),
    "img_size": 32,
    "patch_size": 4,
    "embed_dim": 64,
    "depth": 4,
    "num_heads": 4,
    "mlp_ratio": 2.0,
}
# Preprocessing that travels with the weights: an 8x8 "L" PNG, .convert("RGB"),
# upsampled to 32x32 by timm's eval transform, then scaled to [-1, 1].
DATA_CONFIG = {
    "input_size": (3, 32, 32),
    "interpolation": "bilinear",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 1.0,
    "crop_mode": "center",
}
DROP_PATH_RATE = 0.1  # training-only; timm leaves drop rates out of the saved model_args
BATCH_SIZE = 64
LR = 2e-3
WEIGHT_DECAY = 0.05
WARMUP_EPOCHS = 3
LABEL_SMOOTHING = 0.1
SHIFTS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
DEFAULT_OUT = Path("enginekit/models/digits-vit")
DEFAULT_EPOCHS = 40  # ~1.5 min on 2 idle CPU cores; 60 gained two test images


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)


def build_model() -> torch.nn.Module:
    model = timm.create_model(ARCHITECTURE, pretrained=False, drop_path_rate=DROP_PATH_RATE, **MODEL_ARGS)
    # Start from a clean cfg: the registry's entry names ImageNet weights this
    # model never saw (tag, url, 224px bicubic preprocessing).
    model.pretrained_cfg = {
        "architecture": ARCHITECTURE,
        "tag": "enginekit_digits",
        "custom_load": False,
        "fixed_input_size": True,
        "num_classes": len(LABELS),
        "pool_size": None,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **DATA_CONFIG,
    }
    return model


def shift(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Move (N, 8, 8) images by (dy, dx) pixels, filling with background (0)."""
    out = np.zeros_like(images)
    h, w = images.shape[1:]
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = images[
        :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def to_inputs(images: np.ndarray, transform) -> torch.Tensor:
    """Apply ``transform`` exactly as a caller would to an 8x8 grayscale PNG."""
    return torch.stack([transform(Image.fromarray(image).convert("RGB")) for image in images])


@torch.no_grad()
def predict(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(batch) for batch in inputs.split(256)])


def train(
    model: torch.nn.Module,
    bank: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    seed: int,
) -> None:
    """AdamW, linear warm-up then cosine decay per step; each epoch draws one shift per image."""
    n = labels.numel()
    steps_per_epoch = math.ceil(n / BATCH_SIZE)
    total = epochs * steps_per_epoch
    warmup = min(WARMUP_EPOCHS * steps_per_epoch, total // 2)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in ("pos_embed", "cls_token") else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}], lr=LR
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))),
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(n)
    bar = tqdm(range(epochs), desc="train", unit="epoch")
    for _ in bar:
        model.train()
        variant = torch.randint(len(SHIFTS), (n,), generator=gen)
        order = torch.randperm(n, generator=gen)
        total_loss = 0.0
        for idx in order.split(BATCH_SIZE):
            x = bank[variant[idx], rows[idx]]
            loss = loss_fn(model(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * idx.numel()
        bar.set_postfix(loss=f"{total_loss / n:.4f}", lr=f"{schedule.get_last_lr()[0]:.2e}")


def model_card(
    *, params: int, n_train: int, correct: int, total: int, size: int, sha256: str, epochs: int, seed: int
) -> str:
    """The README.md of the model folder; its accuracy line is what the tests check against."""
    accuracy = 100 * correct / total
    return f"""---
license: apache-2.0
library_name: timm
tags: [image-classification, timm, enginekit, test-model]
---

# digits-vit: enginekit's built-in demo classifier

A tiny Vision Transformer trained from scratch on scikit-learn's handwritten
digits. It is enginekit's default model: small enough to ship in the wheel, so
export, quantization, compilation, benchmarks and the server can be exercised
offline with a real, trained classifier.

## Intended use

A demo and test model only. Its inputs are 8x8 scans of digits from one small
1990s dataset; it is **not** for real digit recognition (photos, handwriting,
MNIST-style 28x28 images) and says nothing about how a real model performs.

## Model

- timm `{ARCHITECTURE}` rebuilt with `{", ".join(f"{k}={v}" for k, v in MODEL_ARGS.items())}`:
  64 patch tokens of 4x4 pixels plus a class token, 4 blocks of width 64.
- Parameters: {params:,}
- Weights: `model.safetensors`, {size:,} bytes (fp32), sha256 `{sha256}`
- Preprocessing (in `config.json`, applied by timm's eval transform): open the
  8x8 grayscale image, `.convert("RGB")`, resize to 32x32 (bilinear,
  crop_pct 1.0), scale to [-1, 1] (mean 0.5, std 0.5).
- Labels: `config.json` `label_names` = "0".."9".

Load it with timm:

```python
import timm
from timm.data import create_transform, resolve_model_data_config

model = timm.create_model("local-dir:enginekit/models/digits-vit", pretrained=True).eval()
transform = create_transform(**resolve_model_data_config(model), is_training=False)
```

## Data and split

`sklearn.datasets.load_digits()`: {n_train + total:,} images, ink levels 0..16 scaled to
0..255 uint8. Stratified `train_test_split(test_size={TEST_FRACTION}, random_state={SPLIT_SEED})`:
{n_train:,} training and {total} held-out images
(`enginekit.models.digits.digits_split()`).

## Training

```
python scripts/train_default_model.py --epochs {epochs} --seed {seed}
```

Seed {seed}, {epochs} epochs, batch {BATCH_SIZE}, AdamW (lr {LR}, weight decay {WEIGHT_DECAY}),
{WARMUP_EPOCHS} warm-up epochs then cosine decay, label smoothing {LABEL_SMOOTHING},
drop path {DROP_PATH_RATE}. Inputs go through the same eval transform as above;
the only augmentation is a random shift of the 8x8 image by up to one pixel
(zero fill) before the transform. The script runs with
`torch.use_deterministic_algorithms(True)` on 2 CPU threads: with torch
{torch.__version__.split("+")[0]} and timm {timm.__version__} it reproduced these weights byte for byte;
another CPU or library build may round differently.

## Evaluation

Held-out accuracy: **{accuracy:.2f}%** ({correct} of {total} test images),
measured by the training script on the saved and reloaded model with the plain
eval transform.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model folder to write (replaced if present)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    started = time.perf_counter()

    # 1. Data.
    seed_everything(args.seed)
    x_train, y_train, x_test, y_test = digits_split()

    # 2. Model and the preprocessing that ships with it.
    model = build_model()
    transform = create_transform(**resolve_model_data_config(model), is_training=False)
    params = sum(p.numel() for p in model.parameters())

    # 3. Inputs, transformed once: bank[s, i] is train image i shifted by SHIFTS[s].
    bank = torch.stack([to_inputs(shift(x_train, dy, dx), transform) for dy, dx in SHIFTS])
    labels = torch.from_numpy(y_train)

    # 4. Train.
    train(model, bank, labels, args.epochs, args.seed)
    model.eval()

    # 5 and 6. Save atomically, reload through timm's local-dir source, compare.
    out: Path = args.out
    with atomic_folder(out, overwrite=True) as tmp:
        timm.models.save_for_hf(
            model,
            tmp,
            model_config={"label_names": list(LABELS)},
            model_args=MODEL_ARGS,
            safe_serialization=True,
            data_config=DATA_CONFIG,
        )
        (tmp / "pytorch_model.bin").unlink(missing_ok=True)
        reloaded = timm.create_model(f"local-dir:{tmp}", pretrained=True).eval()
        test_transform = create_transform(**resolve_model_data_config(reloaded), is_training=False)
        test_inputs = to_inputs(x_test, test_transform)
        logits = predict(reloaded, test_inputs)
        if not torch.equal(logits, predict(model, test_inputs)):
            raise SystemExit("the reloaded model's logits differ from the trained model's")
        correct = int((logits.argmax(1) == torch.from_numpy(y_test)).sum())
        weights = tmp / "model.safetensors"
        size, digest = weights.stat().st_size, sha256_file(weights)
        card = model_card(
            params=params, n_train=len(y_train), correct=correct, total=len(y_test), size=size, sha256=digest,
            epochs=args.epochs, seed=args.seed,
        )
        (tmp / "README.md").write_text(card, encoding="utf-8")

    elapsed = time.perf_counter() - started
    summary = {
        "out": str(out),
        "params": params,
        "heldout_accuracy": round(100 * correct / len(y_test), 2),
        "correct": correct,
        "total": len(y_test),
        "safetensors_bytes": size,
        "safetensors_sha256": digest,
        "seconds": round(elapsed, 1),
    }
    print(f"held-out accuracy: {100 * correct / len(y_test):.2f}% ({correct}/{len(y_test)})")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
