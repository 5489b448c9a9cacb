"""One side of :mod:`benchmarks.peers`, run by the peers' own Python (their virtual environment:
transformers < 5, diffusers < 0.36, optimum-intel, openvino-genai, openvino-tokenizers).

    python benchmarks/peers_child.py ROLE '{"model": ..., ...}'

Roles: ``diffusers`` (eager fp32: the reference image and the baseline), ``export-optimum``
(optimum-intel's OpenVINO export of the model folder, with the tokenizer converted for GenAI),
``optimum`` (optimum-intel's ``OVDiffusionPipeline``, static shapes) and ``genai`` (OpenVINO
GenAI's ``Text2ImagePipeline``, static shapes). Every timed side draws its initial latents with
torch's CPU generator at the seed (GenAI's ``TorchGenerator`` draws the same numbers), warms up
with one 1-step image, then times ``repeats`` pairs of a 1-step and an S-step image. Prints one
JSON line: the times and where the S-step image (float32, NHWC in [0, 1]) was saved.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def _latents(shape: tuple[int, ...], seed: int) -> Any:
    import torch

    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def _timed(run: Callable[[int], np.ndarray], steps: int, repeats: int) -> dict[str, Any]:
    """Warm-up (2 steps: a step-cached pipeline opens its cut engine on the second), then ``repeats``
    x (1 step, ``steps`` steps): per-step (T_S - T_1) / (S - 1) and T_S."""
    run(2)
    pairs, image = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        run(1)
        one = time.perf_counter() - start
        start = time.perf_counter()
        image = run(steps)
        whole = time.perf_counter() - start
        pairs.append((one, whole))
    per_step = [(w - o) / (steps - 1) for o, w in pairs]
    return {"step_s": float(np.median(per_step)), "image_s": float(np.median([w for _, w in pairs])),
            "one_step_s": float(np.median([o for o, _ in pairs])), "pairs_s": pairs, "image": image}


def _diffusers(a: dict[str, Any]) -> dict[str, Any]:
    import diffusers
    import torch

    torch.set_num_threads(a["threads"]) if a.get("threads") else None
    index = json.loads((Path(a["model"]) / "model_index.json").read_text())
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}  # SD3 without T5
    pipe = diffusers.DiffusionPipeline.from_pretrained(a["model"], torch_dtype=torch.float32, **absent)
    pipe.set_progress_bar_config(disable=True)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    shape = (1, denoiser.config.in_channels, a["size"] // pipe.vae_scale_factor, a["size"] // pipe.vae_scale_factor)

    def run(steps: int) -> np.ndarray:
        with torch.inference_mode():
            return pipe(a["prompt"], negative_prompt=a["negative"], num_inference_steps=steps,
                        guidance_scale=a["guidance"], height=a["size"], width=a["size"],
                        latents=_latents(shape, a["seed"]), output_type="np", **a.get("call", {})).images[0]

    return _timed(run, a["steps"], a["repeats"])


def _export_optimum(a: dict[str, Any]) -> dict[str, Any]:
    from optimum.intel import OVDiffusionPipeline

    start = time.perf_counter()
    extra = {}
    if a.get("torch_dtype"):  # the torch weights optimum-intel loads to convert (fp32 SDXL needs > 22 GiB)
        import torch

        extra["torch_dtype"] = getattr(torch, a["torch_dtype"])
    pipe = OVDiffusionPipeline.from_pretrained(a["model"], export=True, compile=False, **extra)
    pipe.save_pretrained(a["out"])
    out = Path(a["out"])
    if not (out / "tokenizer" / "openvino_tokenizer.xml").exists():  # GenAI reads the converted tokenizer
        import openvino as ov
        from openvino_tokenizers import convert_tokenizer
        from transformers import AutoTokenizer

        for sub in ("tokenizer", "tokenizer_2"):
            if (Path(a["model"]) / sub).is_dir():
                ov.save_model(convert_tokenizer(AutoTokenizer.from_pretrained(Path(a["model"]) / sub)),
                              str(out / sub / "openvino_tokenizer.xml"))
    return {"export_s": time.perf_counter() - start}


def _optimum(a: dict[str, Any]) -> dict[str, Any]:
    import torch
    from optimum.intel import OVDiffusionPipeline

    pipe = OVDiffusionPipeline.from_pretrained(a["ov_model"], compile=False)
    pipe.reshape(batch_size=1, height=a["size"], width=a["size"], num_images_per_prompt=1)
    start = time.perf_counter()
    pipe.compile()
    compile_s = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)
    f = pipe.vae_scale_factor
    shape = (1, int(pipe.unet.config.get("in_channels", 4)), a["size"] // f, a["size"] // f)

    def run(steps: int) -> np.ndarray:
        with torch.inference_mode():
            return pipe(a["prompt"], negative_prompt=a["negative"], num_inference_steps=steps,
                        guidance_scale=a["guidance"], height=a["size"], width=a["size"],
                        latents=_latents(shape, a["seed"]), output_type="np").images[0]

    return {**_timed(run, a["steps"], a["repeats"]), "compile_s": compile_s}


def _genai(a: dict[str, Any]) -> dict[str, Any]:
    import openvino_genai as genai

    pipe = genai.Text2ImagePipeline(a["ov_model"])
    config = pipe.get_generation_config()
    if "taylorseer" in a:  # SD3/FLUX: GenAI's TaylorSeer off (None) or on with these settings
        config.taylorseer_config = None
        if a["taylorseer"]:
            config.taylorseer_config = genai.TaylorSeerCacheConfig()
            for key, value in a["taylorseer"].items():
                setattr(config.taylorseer_config, key, value)
    if "max_sequence_length" in a.get("call", {}):  # T5's length is part of the static reshape
        config.max_sequence_length = a["call"]["max_sequence_length"]
    pipe.set_generation_config(config)
    pipe.reshape(1, a["size"], a["size"], a["guidance"])
    start = time.perf_counter()
    pipe.compile("CPU")
    compile_s = time.perf_counter() - start

    def run(steps: int) -> np.ndarray:
        out = pipe.generate(a["prompt"], negative_prompt=a["negative"], num_inference_steps=steps,
                            guidance_scale=a["guidance"], height=a["size"], width=a["size"],
                            generator=genai.TorchGenerator(a["seed"]), **a.get("call", {}))
        return np.asarray(out.data)[0].astype(np.float32) / 255.0

    return {**_timed(run, a["steps"], a["repeats"]), "compile_s": compile_s}


def _latency(call: Callable[[], Any], warmup: int, runs: int) -> dict[str, Any]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {"ms": float(np.median(times) * 1e3), "p90_ms": float(np.percentile(times, 90) * 1e3), "runs": runs}


def _classifier(a: dict[str, Any], run: Callable[[np.ndarray], np.ndarray]) -> dict[str, Any]:
    """Batch-1 latency on the first input, and the logits of every input (saved for agreement)."""
    x = np.load(a["inputs"])
    result = _latency(lambda: run(x[:1]), a["warmup"], a["runs"])
    logits = np.concatenate([run(x[i:i + 1]) for i in range(len(x))])
    path = Path(a["out_dir"]) / f"{a['role']}-logits.npy"
    np.save(path, logits.astype(np.float32))
    return {**result, "logits_path": str(path)}


def _timm_local(folder: str) -> Any:
    """A timm checkpoint folder (``save_for_hf``'s config.json + model.safetensors), loaded locally."""
    import timm

    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()


def _vit_eager(a: dict[str, Any]) -> dict[str, Any]:
    import torch

    if a.get("library") == "timm":
        model = _timm_local(a["model"])
        call = model
    else:
        from transformers import ViTForImageClassification

        model = ViTForImageClassification.from_pretrained(a["model"]).eval()

        def call(x: Any) -> Any:
            return model(pixel_values=x).logits

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return call(torch.from_numpy(x)).numpy()

    return _classifier(a, run)


def _optimum_timm(folder: str) -> Any:
    """What ``OVModelForImageClassification.from_pretrained("timm/...")`` does for a hub timm model
    (``TimmConfig`` + ``TimmForImageClassification`` exported with ``TimmOpenVINOConfig``), on a
    local folder: optimum-intel reads timm configs from the hub only."""
    from optimum.intel import OVModelForImageClassification
    from optimum.intel.openvino.modeling_timm import TimmConfig, TimmForImageClassification, TimmOpenVINOConfig

    raw = json.loads((Path(folder) / "config.json").read_text())
    raw["num_labels"] = raw.pop("num_classes")
    raw["image_size"] = raw["pretrained_cfg"]["input_size"][-1]
    config = TimmConfig.from_dict(raw)

    class Local(TimmForImageClassification):
        def __init__(self, config: Any) -> None:
            super(TimmForImageClassification, self).__init__(config)
            self.model = _timm_local(folder)

    model = Local(config)
    return OVModelForImageClassification._to_load(model=model, config=config,
                                                  exporter_config=TimmOpenVINOConfig(model.config), stateful=False)


def _vit_optimum(a: dict[str, Any]) -> dict[str, Any]:
    import torch
    from optimum.intel import OVModelForImageClassification

    start = time.perf_counter()
    if a.get("library") == "timm":
        model = _optimum_timm(a["model"])
    else:
        model = OVModelForImageClassification.from_pretrained(a["model"], export=True)
    load_s = time.perf_counter() - start

    def run(x: np.ndarray) -> np.ndarray:
        return np.asarray(model(pixel_values=torch.from_numpy(x)).logits)

    return {**_classifier(a, run), "export_and_load_s": load_s}


ROLES = {"diffusers": _diffusers, "export-optimum": _export_optimum, "optimum": _optimum, "genai": _genai,
         "vit-eager": _vit_eager, "vit-optimum": _vit_optimum}


def main() -> None:
    role, args = sys.argv[1], json.loads(sys.argv[2])
    args["role"] = role
    result = ROLES[role](args)
    image = result.pop("image", None)
    if image is not None:
        path = Path(args["out_dir"]) / f"{role}.npy"
        np.save(path, np.asarray(image, dtype=np.float32))
        result["image_path"] = str(path)
    import importlib.metadata as md

    versions = {}
    for name in ("torch", "diffusers", "transformers", "optimum-intel", "openvino", "openvino-genai"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    result["versions"] = versions
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
