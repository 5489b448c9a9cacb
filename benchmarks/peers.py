"""enginekit's ``optimize`` pick against its peers on the same weights, latents and machine, in one run.

The peers: diffusers eager fp32 (the baseline and the reference image), optimum-intel's
``OVDiffusionPipeline`` and OpenVINO GenAI's torch-free ``Text2ImagePipeline``, both with static
shapes at the size (OpenVINO's default precision: bf16 on a CPU with AMX or AVX512-BF16). They
run in their own virtual environment (``--peer-venv``, built here when missing: they need
transformers < 5 and diffusers < 0.36; GenAI reads the tokenizer that openvino-tokenizers
converts), each side in a fresh process, one at a time.

1. the model folder: the architecture's config (``--model sd15``) with seeded weights and the real
   CLIP tokenizer, saved as a diffusers folder with the Euler scheduler (every side samples Euler);
2. diffusers eager fp32 draws the reference image and is timed;
3. optimum-intel exports the folder to OpenVINO (the IR both peers run) and is timed; then GenAI;
4. ``enginekit optimize FOLDER --size S -o WORK/best`` (``--optimize-args`` adds flags), as a
   user runs it; its pick (with the step cache it picked, if any) is timed, and the same engine
   without the cache.

Each timed side draws its initial latents with torch's CPU generator at ``--seed`` (GenAI's
``TorchGenerator`` draws the same numbers), warms up with a 1-step image, then times
``--repeats`` pairs of a 1-step and an S-step image: a step is (T_S - T_1) / (S - 1), the image
T_S (prompt to pixels), medians over the repeats. ``--steps`` S defaults to 7, so steps 2..7
hold whole cycles of deepcache:2 and :3. Fidelity: PSNR of each S-step image against diffusers'.
Prints the table with each side's speed-up over the faster peer and writes ``WORK/peers.json``;
finished stages are kept (``--redo`` runs them again). Minutes: about 40 at SD 1.5 / 512 on
2 cores (the optimize run is most of it)::

    .venv/bin/python -m benchmarks.peers --work /tmp/peers
    .venv/bin/python -m benchmarks.peers --work /tmp/peers-smoke --model tiny-sd15 --size 64 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.runs import log as _log
from benchmarks.runs import stage_runner

PROMPT = "a red fox sitting in fresh snow, morning light, detailed photograph"
NEGATIVE = "blurry, low quality"
#: What the peers' environment holds (transformers and diffusers before the releases optimum-intel
#: does not run with; OpenVINO and GenAI at this project's OpenVINO release).
PEER_REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1", "transformers<5", "diffusers<0.36",
                     "optimum-intel[openvino]", "openvino-tokenizers", "openvino-genai", "accelerate", "pillow",
                     "protobuf", "sentencepiece", "timm"]  # timm: the detector, through optimum-intel's timm path
TARGET = 1.3
#: The pipeline run's own `enginekit optimize` flags (vit-base takes none unless given).
PIPELINE_OPTIMIZE_ARGS = "--backends openvino --precisions fp16"
CHILD = Path(__file__).with_name("peers_child.py")


def ensure_peer_venv(venv: Path) -> Path:
    """The peers' Python: ``venv``, built with :data:`PEER_REQUIREMENTS` when it has none; the
    OpenVINO release pinned to this environment's, so every side runs the same kernels."""
    python = venv / "bin" / "python"
    if python.exists():
        return python
    import importlib.metadata as md

    ov = md.version("openvino")
    release = ".".join(ov.split(".")[:3])
    pins = [f"openvino=={ov}", f"openvino-genai=={release}.*", f"openvino-tokenizers=={release}.*"]
    reqs = [r for r in PEER_REQUIREMENTS if not r.startswith(("openvino-genai", "openvino-tokenizers"))] + pins
    _log(f"building the peers' environment in {venv}: {' '.join(reqs)}")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *reqs], check=True)
    return python


def run_child(cmd: list[str], log_path: Path) -> dict[str, Any]:
    """Run one side in a fresh process; its RESULT line, or an error naming its log."""
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail), "log": str(log_path)}
    return json.loads(lines[-1][len("RESULT "):])


def build_model(model: str, folder: Path, seed: int, without_t5: bool = False) -> None:
    """The architecture with seeded weights and the real CLIP tokenizer, as a diffusers folder;
    a UNet pipeline with the Euler scheduler (a flow-matching one keeps its own)."""
    import diffusers

    from enginekit.export.diffusion.sources import resolve_pipeline

    pipe = resolve_pipeline(model, random_weights=True, seed=seed, without_t5=without_t5).pipeline
    if hasattr(pipe, "unet"):
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(folder, safe_serialization=True)
    # transformers 5 saves the fast tokenizer alone; the peers' transformers 4 (its slow CLIPTokenizer)
    # and a hub folder have the BPE files beside it.
    from tokenizers import Tokenizer

    for sub in folder.glob("tokenizer*"):
        if (sub / "tokenizer.json").exists() and not (sub / "vocab.json").exists():
            Tokenizer.from_file(str(sub / "tokenizer.json")).model.save(str(sub))
    # transformers 5 also drops CLIP's "text_model." key prefix, which transformers 4 needs (it would
    # silently start those weights from random): written back as a hub checkpoint has them.
    from safetensors.torch import load_file, save_file

    for path in folder.glob("text_encoder*/*.safetensors"):
        weights = load_file(str(path))
        if any(k.startswith(("embeddings.", "encoder.", "final_layer_norm.")) for k in weights):
            fixed = {("text_model." + k if k.startswith(("embeddings.", "encoder.", "final_layer_norm.")) else k): v
                     for k, v in weights.items()}
            save_file(fixed, str(path), metadata={"format": "pt"})


#: The classifier peers' models: ``--model`` -> (library, architecture, what the table calls it).
CLASSIFIERS = {
    "vit-base": ("transformers", "ViT-B/16", "ViT-B/16 at 224 (transformers' ViTConfig defaults)"),
    "detector": ("timm", "vit_small_patch16_384", "vit_small_patch16_384 at 384 (timm, the seed detector's shape)"),
}


def build_classifier(name: str, folder: Path, seed: int, inputs: Path, n: int = 32) -> dict[str, Any]:
    """A detector-shaped classifier (seeded body, a 2-label head fitted with margin: see
    :mod:`benchmarks.detector`) saved as its library saves it, and ``n`` held-out inputs beside it,
    preprocessed as the model's processor does: half photo crops (seed 7, neither fitting nor
    ``optimize``'s calibration crops), half pattern images (seed 7)."""
    import numpy as np
    import torch

    from benchmarks.detector import build_detector, fit_margin_head, margin_check
    from enginekit.quant.data import pattern_images, photo_crops
    from enginekit.runtimes.preprocess import preprocess

    if CLASSIFIERS[name][0] == "timm":
        info = build_detector(folder, seed=seed)
        from enginekit.export.preprocessing import from_timm_data_config

        cfg = from_timm_data_config(info["preprocessing"])
    else:
        import transformers

        from enginekit.export.preprocessing import from_transformers

        torch.manual_seed(seed)
        config = transformers.ViTConfig(num_labels=2, id2label={0: "china", 1: "flower"},
                                        label2id={"china": 0, "flower": 1})
        model = transformers.ViTForImageClassification(config).eval()
        processor = transformers.ViTImageProcessor()
        cfg = from_transformers(processor)
        fit = fit_margin_head(lambda x: model.vit(pixel_values=torch.from_numpy(x)).last_hidden_state[:, 0].numpy(),
                              model.classifier, cfg)
        info = {"architecture": "ViTForImageClassification", "seed": seed, "fit": fit,
                "check": margin_check(lambda x: model(pixel_values=torch.from_numpy(x)).logits.numpy(), cfg)}
        model.save_pretrained(folder, safe_serialization=True)
        processor.save_pretrained(folder)
    half = n // 2
    images = photo_crops(half, 7) + pattern_images(n - half, 7)
    np.save(inputs, np.concatenate([preprocess(images[i:i + 8], cfg) for i in range(0, n, 8)]).astype(np.float32))
    return info


def _classifier_child(a: dict[str, Any]) -> dict[str, Any]:
    """The pick's engine alone (``run_pixels``, no preprocessing) on the peers' inputs, batch 1."""
    import numpy as np

    sys.path.insert(0, str(CHILD.parent))
    from peers_child import _latency  # noqa: PLC0415

    import enginekit

    model = enginekit.load(a["artifact"], device="cpu")
    x = np.load(a["inputs"])
    result = _latency(lambda: model.run_pixels(x[:1]), a["warmup"], a["runs"])
    logits = np.concatenate([model.run_pixels(x[i:i + 1])["logits"] for i in range(len(x))])
    path = Path(a["out_dir"]) / "enginekit-logits.npy"
    np.save(path, logits.astype(np.float32))
    return {**result, "logits_path": str(path)}


def _enginekit_child(a: dict[str, Any]) -> dict[str, Any]:
    """The pick timed as the peers are (the same protocol and latents), with cache ``a["cache"]``."""
    if a.get("task") == "image-classification":
        return _classifier_child(a)
    import numpy as np
    import torch

    sys.path.insert(0, str(CHILD.parent))
    from peers_child import _timed  # noqa: PLC0415 - the shared protocol

    import enginekit

    pipe = enginekit.load(a["artifact"], device="cpu")
    shape = pipe.layout.latent_shape(1, a["size"], a["size"])
    latents = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(a["seed"]),
                          dtype=torch.float32).numpy()

    call = a.get("call") or {"negative_prompt": a["negative"], "scheduler": "euler"}

    def run(steps: int) -> np.ndarray:
        return pipe(a["prompt"], num_inference_steps=steps, guidance_scale=a["guidance"], height=a["size"],
                    width=a["size"], latents=latents, output_type="np", cache=a["cache"], **call).images[0]

    result = _timed(run, a["steps"], a["repeats"])
    image = result.pop("image")
    path = Path(a["out_dir"]) / f"enginekit-{a['label']}.npy"
    np.save(path, image)
    return {**result, "image_path": str(path)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--model", default="sd15", help="An architecture enginekit builds with seeded weights, or a "
                                                         "classifier: vit-base (ViT-B/16 at 224) or detector "
                                                         "(vit_small_patch16_384), each with a 2-label head fitted "
                                                         "with margin.")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--peer-venv", type=Path, default=None, help="default: WORK/peers-venv")
    parser.add_argument("--optimize-args", default=PIPELINE_OPTIMIZE_ARGS,
                        help="More flags for `enginekit optimize` (default for pipelines: %(default)s; none for "
                             "classifiers).")
    parser.add_argument("--runs", type=int, default=200, help="classifiers: timed runs per side.")
    parser.add_argument("--peer-torch-dtype", choices=("float16", "bfloat16"), default=None,
                        help="The torch weights optimum-intel loads to export (default its own, fp32): float16 "
                             "for full-size SDXL, whose fp32 export passes 22 GiB.")
    parser.add_argument("--peer-ir", choices=("optimum", "enginekit"), default="optimum",
                        help="The IR folder the peers run: optimum-intel's own export (default), or enginekit's "
                             "fp16 IRs in GenAI's layout (`compile --genai`), for models whose optimum-intel export "
                             "does not fit in memory (full-size SDXL on 24 GB).")
    parser.add_argument("--redo", default="", help="Comma-separated stages to run again: model, diffusers, "
                                                    "export-optimum, optimum, genai, optimize, enginekit.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-args", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(_enginekit_child(json.loads(args.child_args))))
        return 0

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    state_path = work / "peers.json"
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.exists() else {}
    redo = set(filter(None, args.redo.split(",")))
    if "model" in redo:  # new weights: every side again
        redo |= {"diffusers", "export-optimum", "optimum", "genai", "optimize", "enginekit", "enginekit-uncached"}
    common = {"prompt": PROMPT, "negative": NEGATIVE, "size": args.size, "steps": args.steps,
              "guidance": args.guidance, "seed": args.seed, "repeats": args.repeats, "out_dir": str(work)}
    if state.get("common") not in (None, common):
        redo |= {"diffusers", "optimum", "genai", "enginekit"}  # the protocol changed: time everything again
    state["common"] = common

    stage = stage_runner(state, state_path, redo)

    from enginekit.hardware import fingerprint

    hw = fingerprint()
    state["hardware"] = {k: hw.get(k) for k in ("cpu_model", "physical_cores", "logical_cores", "flags")}
    if args.model in CLASSIFIERS:
        return _classifiers(args, work, logs, state, state_path, stage)
    model = work / "model"
    stage("model", lambda: (build_model(args.model, model, args.seed), {"folder": str(model)})[1])
    python = str(ensure_peer_venv(args.peer_venv or work / "peers-venv"))
    ov_model = work / "ov-optimum"

    def child(role: str, **extra: Any) -> dict[str, Any]:
        payload = {**common, "model": str(model), "ov_model": str(ov_model), **extra}
        return run_child([python, str(CHILD), role, json.dumps(payload)], logs / f"{role}.log")

    stage("diffusers", lambda: child("diffusers"))
    if args.peer_ir == "enginekit":
        ov_model = work / "ov-enginekit"
        stage("export-genai", lambda: _genai_folder(model, ov_model, work, logs, "--streaming" in args.optimize_args))
    else:
        stage("export-optimum", lambda: child("export-optimum", out=str(ov_model), torch_dtype=args.peer_torch_dtype))
    stage("optimum", lambda: child("optimum"))
    stage("genai", lambda: child("genai"))

    best = work / "best"

    picked = stage("optimize", lambda: _optimize(model, best, work, logs, args.optimize_args, args.size))
    if "error" not in picked:
        from enginekit.manifest import read_manifest

        cache = read_manifest(best).task_config.get("default_cache") or "none"

        def engine(label: str, cache: str) -> dict[str, Any]:
            payload = {**common, "artifact": str(best), "cache": cache, "label": label}
            return {**run_child([sys.executable, "-m", "benchmarks.peers", "--work", str(work), "--child", "1",
                                 "--child-args", json.dumps(payload)], logs / f"enginekit-{label}.log"),
                    "cache": cache}

        stage("enginekit", lambda: engine("pick", cache))
        if cache != "none":
            stage("enginekit-uncached", lambda: engine("uncached", "none"))
        stage("floor", lambda: floor(best, args.size, state["hardware"]))
    state_path.write_text(json.dumps(state, indent=1, default=str))
    print(render(state))
    return 0


def floor(best: Path, size: int, hw: dict[str, Any]) -> dict[str, Any]:
    """Where the pick's time goes (its components' calls, from optimize's report) and its UNet
    call against this CPU's arithmetic floor in the precision it computes in."""
    from benchmarks.pipeline_targets import clock_ghz, flops_per_cycle, unet_flops
    from enginekit.manifest import read_manifest

    report = json.loads((best / "report.json").read_text())
    pick = next(oc for oc in report["candidates"] if oc["status"] == "picked")
    flops = unet_flops(read_manifest(best), size)
    ghz, cores = clock_ghz(), int(hw.get("physical_cores") or 1)
    per_cycle = flops_per_cycle(hw.get("flags") or [])
    floors = {p: flops / (cores * ghz * 1e9 * n) * 1e3 for p, (n, _) in per_cycle.items()} if ghz else {}
    return {"components_ms": pick["timing"]["components_ms"], "calls_per_image": pick["timing"]["calls_per_image"],
            "unet_gflop": flops / 1e9, "clock_ghz": ghz, "cores": cores, "floor_ms": floors,
            "assumed": {p: why for p, (_, why) in per_cycle.items()}}


def _genai_folder(model: Path, out: Path, work: Path, logs: Path, streaming: bool) -> dict[str, Any]:
    """enginekit's export of ``model`` compiled to fp16 IRs in GenAI's (optimum's) folder layout."""
    onnx = work / "peer-onnx"
    start = time.monotonic()
    cli = [sys.executable, "-m", "enginekit.app.cli"]
    steps = [[*cli, "export", str(model), "-o", str(onnx), "--overwrite", *(["--streaming"] if streaming else [])],
             [*cli, "compile", str(onnx), "-b", "openvino", "--precision", "fp16", "--genai", "-o", str(out),
              "--overwrite"]]
    try:
        for cmd in steps:
            with open(logs / "export-genai.log", "a") as log:
                if subprocess.run(cmd, stdout=log, stderr=log).returncode != 0:
                    return {"error": f"{' '.join(cmd[3:5])} failed: see {logs / 'export-genai.log'}"}
    finally:
        shutil.rmtree(onnx, ignore_errors=True)
    return {"export_s": time.monotonic() - start, "ir": "enginekit fp16 IRs, compile --genai"}


def _optimize(model: Path, best: Path, work: Path, logs: Path, extra: str, size: int | None) -> dict[str, Any]:
    """``enginekit optimize MODEL -o BEST`` as a user runs it; what became of each candidate."""
    cmd = [sys.executable, "-m", "enginekit.app.cli", "optimize", str(model), "-o", str(best),
           "--work", str(work / "optimize"), "--overwrite", "--json", *shlex.split(extra)]
    if size:
        cmd += ["--size", str(size)]
    start = time.monotonic()
    with open(logs / "optimize.log", "w") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    if proc.returncode != 0:
        tail = (logs / "optimize.log").read_text(errors="replace").strip().splitlines()[-3:]
        return {"error": f"optimize exit {proc.returncode}: " + " | ".join(tail), "command": cmd}
    report = json.loads(proc.stdout)
    return {"picked": report["picked"], "seconds": time.monotonic() - start, "command": " ".join(cmd[1:]),
            "candidates": [{"name": oc["candidate"]["name"], "status": oc["status"], "reason": oc.get("reason"),
                            "step_ms": (oc.get("timing") or {}).get("step_ms")
                            or (oc.get("record") or {}).get("p50_ms"),
                            "psnr_db_min": (oc.get("fidelity") or {}).get("psnr_db_min")}
                           for oc in report["candidates"]]}


def _classifiers(args: argparse.Namespace, work: Path, logs: Path, state: dict[str, Any], state_path: Path,
                 stage: Any) -> int:
    """A classifier: PyTorch eager, optimum-intel's OVModelForImageClassification and the optimize
    pick, batch 1 on the same inputs (median of --runs after a warm-up), top-1 agreement with eager."""
    model, inputs, best = work / "vit-model", work / "vit-inputs.npy", work / "vit-best"
    stage("vit-model", lambda: {"folder": str(model), "model": args.model,
                                **build_classifier(args.model, model, args.seed, inputs)})
    python = str(ensure_peer_venv(args.peer_venv or work / "peers-venv"))
    common = {"model": str(model), "inputs": str(inputs), "out_dir": str(work), "warmup": 20, "runs": args.runs,
              "library": CLASSIFIERS[args.model][0]}
    for role in ("vit-eager", "vit-optimum"):
        stage(role, lambda role=role: run_child([python, str(CHILD), role, json.dumps(common)], logs / f"{role}.log"))
    extra = args.optimize_args if args.optimize_args != PIPELINE_OPTIMIZE_ARGS else ""
    stage("vit-optimize", lambda: _optimize(model, best, work, logs, extra, None))
    if "error" not in state["stages"]["vit-optimize"]:
        payload = {**common, "artifact": str(best), "task": "image-classification"}
        stage("vit-enginekit", lambda: run_child([sys.executable, "-m", "benchmarks.peers", "--work", str(work),
                                                  "--child", "1", "--child-args", json.dumps(payload)],
                                                 logs / "vit-enginekit.log"))
        from benchmarks.classifier_floor import floor as classifier_floor

        hw = state["hardware"]
        stage("vit-floor", lambda: classifier_floor(best, model, CLASSIFIERS[args.model][0], hw.get("flags") or [],
                                                    int(hw.get("physical_cores") or 1)))
    state_path.write_text(json.dumps(state, indent=1, default=str))
    print(render_classifiers(state))
    return 0


def render_classifiers(state: dict[str, Any]) -> str:
    import numpy as np

    st, hw = state["stages"], state.get("hardware") or {}
    eager = st.get("vit-eager", {})
    ref = np.load(eager["logits_path"]).argmax(1) if "logits_path" in eager else None
    peer = st.get("vit-optimum", {}).get("ms")
    what = CLASSIFIERS.get(st.get("vit-model", {}).get("model", "vit-base"), CLASSIFIERS["vit-base"])[2]
    lines = [f"# {what}, seeded body, 2-label head fitted with margin, batch 1: median of {eager.get('runs')} runs "
             f"on 16 photo crops + 16 patterns; {hw.get('cpu_model')}, {hw.get('physical_cores')} cores", "",
             "| path | ms | vs eager | top-1 agreement with eager | vs optimum-intel |", "|---|---|---|---|---|"]
    names = {"vit-eager": "PyTorch eager fp32", "vit-optimum": "optimum-intel OVModelForImageClassification",
             "vit-enginekit": f"enginekit optimize pick: {st.get('vit-optimize', {}).get('picked')}, engine alone"}
    for name, r in _measured(names, st, "ms", lines, 5):
        agree = float((np.load(r["logits_path"]).argmax(1) == ref).mean()) if ref is not None else None
        vs_eager = f"{eager['ms'] / r['ms']:.2f}x" if "ms" in eager else "-"  # eager may have failed
        lines.append(f"| {name} | {r['ms']:.1f} | {vs_eager} | "
                     + (f"{agree:.3f}" if agree is not None else "") + " | "
                     + (f"{peer / r['ms']:.2f}x |" if peer else " |"))
    if "ms" in st.get("vit-enginekit", {}) and peer:
        ratio = peer / st["vit-enginekit"]["ms"]
        lines += ["", f"target: the pick >= {TARGET}x optimum-intel at batch 1: {ratio:.2f}x -> "
                      + ("MET" if ratio >= TARGET else "MISSED")]
    from benchmarks.classifier_floor import render as floor_lines

    extra = floor_lines(st.get("vit-floor") or {}, st.get("vit-enginekit", {}).get("ms"))
    return "\n".join(lines + ([""] + extra if extra else []))


def _measured(names: dict[str, str], stages: dict[str, Any], field: str, lines: list[str], columns: int) -> Any:
    """(row name, result) of each side that ran and measured ``field``; a failed side gets its
    row here, with its error."""
    for key, name in names.items():
        r = stages.get(key)
        if r is None:
            continue
        if field not in r:
            lines.append(f"| {name} | failed: {r.get('error')} |" + " |" * (columns - 2))
            continue
        yield name, r


def render(state: dict[str, Any]) -> str:
    """The table: each side's step, image, PSNR against diffusers and speed-up over the faster peer."""
    import numpy as np

    from enginekit.fidelity import psnr

    st, c = state["stages"], state["common"]
    hw = state.get("hardware") or {}
    ref = np.load(st["diffusers"]["image_path"]) if "image_path" in st.get("diffusers", {}) else None
    peers = [st[k] for k in ("optimum", "genai") if "step_s" in st.get(k, {})]
    best_step = min((p["step_s"] for p in peers), default=None)
    best_image = min((p["image_s"] for p in peers), default=None)
    eager = st.get("diffusers", {}).get("step_s")
    opt = st.get("optimize", {})
    on_ours = ", on enginekit's fp16 IRs (compile --genai)" if "export-genai" in st else ""
    names = {"diffusers": "diffusers eager fp32", "optimum": "optimum-intel OVDiffusionPipeline, static" + on_ours,
             "genai": "OpenVINO GenAI Text2ImagePipeline, static" + on_ours,
             "enginekit": f"enginekit optimize pick: {opt.get('picked')} (cache {st.get('enginekit', {}).get('cache')})",
             "enginekit-uncached": "the same enginekit engine, cache none"}
    lines = [f"# {c['size']}x{c['size']}, CFG {c['guidance']}, Euler, {c['steps']} steps; step = (T{c['steps']} - T1) / "
             f"{c['steps'] - 1}, median of {c['repeats']}; {hw.get('cpu_model')}, {hw.get('physical_cores')} cores",
             "", "| path | s / step | image s | vs eager (step) | PSNR vs diffusers | vs best peer: step | image |",
             "|---|---|---|---|---|---|---|"]
    for name, r in _measured(names, st, "step_s", lines, 7):
        fid = psnr(ref, np.load(r["image_path"])) if ref is not None and r is not st["diffusers"] else None
        lines.append(f"| {name} | {r['step_s']:.3f} | {r['image_s']:.2f} | "
                     + (f"{eager / r['step_s']:.2f}x | " if eager else "| ")
                     + (f"{fid:.1f} dB" if fid is not None else "reference") + " | "
                     + (f"{best_step / r['step_s']:.2f}x | {best_image / r['image_s']:.2f}x |" if best_step else "| |"))
    if "step_s" in st.get("enginekit", {}) and best_step:
        speed = best_step / st["enginekit"]["step_s"]
        image = best_image / st["enginekit"]["image_s"]
        lines += ["", f"target: the pick >= {TARGET}x the faster peer per step and per image at >= 30 dB: "
                      f"{speed:.2f}x per step, {image:.2f}x per image -> "
                      + ("MET" if speed >= TARGET and image >= TARGET else "MISSED")]
    fl = st.get("floor") or {}
    if fl.get("components_ms"):
        ms = fl["components_ms"]
        lines += ["", "the pick's calls (optimize's timing, median ms per call): " + ", ".join(
            f"{k} {v:.0f}" for k, v in ms.items() if v)]
        if fl.get("floor_ms") and ms.get("unet"):
            lines.append(f"UNet, 2 rows at {c['size']}²: {fl['unet_gflop']:.0f} GFLOP; floor at {fl['cores']} cores x "
                         f"{fl['clock_ghz']:.2f} GHz: " + ", ".join(f"{p} {v:.0f} ms" for p, v in fl["floor_ms"].items())
                         + f"; the full call is {ms['unet'] / fl['floor_ms']['bf16']:.1f}x the bf16 floor")
    if opt.get("candidates"):
        lines += ["", f"optimize ({opt.get('seconds', 0) / 60:.1f} min): " + "; ".join(
            f"{o['name']} {o['status']}" + (f" {o['step_ms']:.0f} ms/step" if o.get("step_ms") else "")
            + (f" {o['psnr_db_min']:.1f} dB" if o.get("psnr_db_min") else "") for o in opt["candidates"])]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
