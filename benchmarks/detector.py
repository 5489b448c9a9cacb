"""A detector-shaped checkpoint to measure ``optimize`` on: the seed model's shape, a head with margin.

The seed model (CommunityForensics-DeepfakeDet-ViT) is a timm
``vit_small_patch16_384`` with a 2-label head. Seeded random weights of that
architecture with a seeded 1000-class head give near-tied logits, on which top-1
agreement measures nothing: any engine "agrees" or "disagrees" by chance. This
module builds the same architecture with a seeded body and a head that decides
with margin:

1. the body: ``timm.create_model(ARCH, num_classes=2)`` after ``torch.manual_seed(seed)``;
   preprocessing as the seed model's (384x384, bicubic, crop 1.0, mean = std = 0.5);
2. features: the body's pre-logits (the class token after the final norm) of
   ``fit_size`` seeded crops of scikit-learn's two sample photos, crop seeds
   :data:`FIT_SEED` and up: never the crops ``optimize`` calibrates or judges on
   (seeds 0 to 3);
3. the head: a logistic regression (scikit-learn, weak regularization) that tells
   the two photographs apart gives the difference of the two logits, ``z`` (the
   decision is its sign, ``|z|`` its margin); it is added as ``-z/2, +z/2`` to the mean
   of timm's seeded head init, the part cross-entropy training would leave alone;
4. saved with timm's ``save_for_hf`` (``config.json`` + ``model.safetensors``), a
   folder ``optimize`` and ``export`` take as MODEL, with ``detector.json`` beside it
   saying how it was made and what margins the head has on fresh crops.

Run::

    .venv/bin/python -m benchmarks.detector out/detector          # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["ARCH", "FIT_SEED", "LABELS", "build_detector", "fit_margin_head", "margin_check"]

ARCH = "vit_small_patch16_384"
#: Which photograph a crop comes from: scikit-learn's sample photos, in their order.
LABELS = ("china", "flower")
#: Crop seeds of the fitting crops (and FIT_SEED + 1 for the margin check).
FIT_SEED = 100
PRETRAINED_CFG = {"input_size": (3, 384, 384), "crop_pct": 1.0, "interpolation": "bicubic",
                  "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def _features(model: Any, x: np.ndarray, batch: int = 8) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            feats = model.forward_features(torch.from_numpy(x[i : i + batch]))
            out.append(model.forward_head(feats, pre_logits=True).numpy())
    return np.concatenate(out)


def _crops(n: int, seed: int, cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """``n`` preprocessed crops and which photo each is from (photo_crops alternates the two)."""
    from enginekit.quant.data import photo_crops
    from enginekit.runtimes.preprocess import preprocess

    images = photo_crops(n, seed)
    x = np.concatenate([preprocess(images[i : i + 16], cfg) for i in range(0, n, 16)])
    return x, np.arange(n) % 2


def fit_margin_head(features: Callable[[np.ndarray], np.ndarray], head: Any, cfg: Any, fit_size: int = 96
                    ) -> dict[str, Any]:
    """Fit the 2-label linear ``head`` (weight ``[2, D]``, bias ``[2]``, changed in place) so it tells
    the two sample photos apart with margin, from ``features`` (pre-logits) of ``fit_size`` crops
    preprocessed by ``cfg``; what the fit scored."""
    import torch
    from sklearn.linear_model import LogisticRegression

    x, y = _crops(fit_size, FIT_SEED, cfg)
    with torch.inference_mode():
        feats = features(x)
    # Weak regularization: the head separates the two photos with a wide margin.
    clf = LogisticRegression(C=100.0, max_iter=5000).fit(feats, y)
    w, b = clf.coef_[0].astype(np.float32), np.float32(clf.intercept_[0])
    with torch.no_grad():
        # Cross-entropy moves only the difference of the two logits; their sum stays where
        # the seeded init put it. So the fitted difference goes on top of the init's mean,
        # as training the head from that init would leave it (and the logits are not mirror
        # images, which would make their cosine a mere sign check).
        mean_w = head.weight.mean(0, keepdim=True)
        mean_b = head.bias.mean()
        head.weight.copy_(mean_w + torch.from_numpy(np.stack([-w / 2, w / 2])))
        head.bias.copy_(mean_b + torch.tensor([-b / 2, b / 2]))
    return {"crops": fit_size, "crop_seed": FIT_SEED, "accuracy": float(clf.score(feats, y))}


def margin_check(logits_of: Callable[[np.ndarray], np.ndarray], cfg: Any, check_size: int = 48) -> dict[str, Any]:
    """The fitted model's accuracy and logit gaps on ``check_size`` fresh crops (seed FIT_SEED + 1)."""
    import torch

    xc, yc = _crops(check_size, FIT_SEED + 1, cfg)
    with torch.inference_mode():
        logits = logits_of(xc)
    gap = np.abs(logits[:, 1] - logits[:, 0])
    return {"crops": check_size, "crop_seed": FIT_SEED + 1, "accuracy": float((logits.argmax(1) == yc).mean()),
            "logit_gap_min": float(gap.min()), "logit_gap_median": float(np.median(gap)),
            "logits_std": float(logits.std())}


def build_detector(out: str | Path, *, seed: int = 0, fit_size: int = 96, check_size: int = 48,
                   arch: str = ARCH, say: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Build the checkpoint into the folder ``out``; return what ``detector.json`` records."""
    import timm
    import torch
    from timm.models import save_for_hf

    from enginekit.export.preprocessing import from_timm

    out = Path(out)
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=len(LABELS)).eval()
    # The seed model's preprocessing; another architecture (a smoke run) keeps its own input size.
    own = {} if arch == ARCH else {"input_size": model.pretrained_cfg.get("input_size", PRETRAINED_CFG["input_size"])}
    model.pretrained_cfg = {**model.pretrained_cfg, **PRETRAINED_CFG, **own, "label_names": list(LABELS)}
    cfg = from_timm(model)
    say(f"features of {fit_size} fitting crops (seed {FIT_SEED}) through the seeded {arch} body")
    fit = fit_margin_head(lambda x: _features(model, x), model.head, cfg, fit_size)
    say(f"margin check on {check_size} fresh crops (seed {FIT_SEED + 1})")
    info = {"architecture": arch, "seed": seed, "labels": list(LABELS), "preprocessing": {**PRETRAINED_CFG, **own},
            "head": "logistic regression on the seeded body's pre-logits, crops of the two sample photos",
            "fit": fit, "check": margin_check(lambda x: model(torch.from_numpy(x)).numpy(), cfg, check_size)}
    out.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, out, model_config={"label_names": list(LABELS)}, safe_serialization=True)
    for stale in out.glob("*.bin"):
        stale.unlink()
    (out / "detector.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="checkpoint folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fit-size", type=int, default=96)
    parser.add_argument("--arch", default=ARCH, help="timm architecture (test_vit for a smoke run)")
    args = parser.parse_args(argv)
    info = build_detector(args.out, seed=args.seed, fit_size=args.fit_size, arch=args.arch,
                          say=lambda msg: print(f"· {msg}", file=sys.stderr, flush=True))
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
