"""The full-size SD3.5 Medium transformer (seeded weights): export to ONNX, one CFG step on the engines.

1. builds ``SD3Transformer2DModel`` from ``enginekit/configs/sd35-medium/transformer/config.json``
   with ``torch.manual_seed(seed)`` (as ``--random-weights`` does; nothing is downloaded);
2. exports only the transformer to ONNX with external data (one ``model.onnx.data``), through
   the pipeline exporter's own wrapper and ``_torch_export``; ``--dtype fp16`` (or bf16) casts the
   weights before export, the graph's IO staying float32 as the artifact contract has it;
3. runs one denoising call with CFG (batch 2, 512x512 -> 64x64 latents, 77 CLIP + 256 T5 tokens,
   16 channels) on OpenVINO, on ONNX Runtime when the export is fp32, and on diffusers/PyTorch
   eager fp32 on the same seeded inputs: ms per call and peak RSS, each side in its own
   subprocess so the peaks are separate, and each engine's cosine / max abs against PyTorch;
4. prints a markdown table and writes ``<work>/sd35_medium.json``.

Each stage runs under a watchdog in this (parent) process that reads the child's RSS and kills
it past ``--rss-limit-gb``. Run (the full size took 13 min on 2 cores, OpenVINO peaking near 18 GiB;
hold the quiet lock)::

    flock /tmp/enginekit-quiet.lock python -m benchmarks.sd35_medium --work /tmp/m --dtype fp32
    python -m benchmarks.sd35_medium --work /tmp/m2 --num-layers 2 --dtype fp32   # the RSS probe
    python -m benchmarks.sd35_medium --work /tmp/L --config sd35-large --dtype bf16 --skip pytorch  # 8B, drawn in bf16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import child_env, run_watched
from enginekit.errors import EngineKitError, ExportError

CONFIG = "sd35-medium"
#: The SD3-family configs whose transformer this script can build (``--config``).
CONFIGS = ("sd3-medium", "sd35-medium", "sd35-large")
_ONNX = Path("onnx") / "transformer" / "model.onnx"
_NAMES = ("sample", "timestep", "encoder_hidden_states", "pooled_projections")
_DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Setup:
    """What is built and what one call is: the config overrides and the call's shape."""

    seed: int = 0
    dtype: str = "fp32"
    #: Which config's transformer (enginekit/configs/<config>/transformer).
    config: str = CONFIG
    #: Transformer config keys replaced (``num_layers`` for the RSS probe; widths for tests).
    overrides: dict[str, Any] = field(default_factory=dict)
    batch: int = 2  # CFG: the unconditional and the conditional rows
    height: int = 512
    width: int = 512
    clip_tokens: int = 77
    t5_tokens: int = 256
    warmup: int = 1
    repeats: int = 3
    #: Fewer repeats when the first timed call says they would take longer than this.
    budget_s: float = 180.0


def transformer_config(overrides: dict[str, Any], config: str = CONFIG) -> dict[str, Any]:
    """The ``config`` transformer config (sd35-medium by default) with ``overrides``;
    dual-attention layers past ``num_layers`` are dropped."""
    from enginekit.export.diffusion.sources import config_dir

    if config not in CONFIGS:
        raise ExportError(f"sd35_medium: config must be one of {', '.join(CONFIGS)}, not {config!r}")
    cfg = json.loads((config_dir(config) / "transformer" / "config.json").read_text())
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ExportError(f"sd35_medium: the transformer config has no {', '.join(sorted(unknown))}")
    cfg.update(overrides)
    cfg["dual_attention_layers"] = [i for i in cfg.get("dual_attention_layers", ()) if i < int(cfg["num_layers"])]
    return cfg


def build_transformer(setup: Setup, dtype: str = "fp32") -> Any:
    """The seeded transformer, as ``_build_seeded`` builds a component: seed, then ``from_config``."""
    import diffusers
    import torch

    if dtype not in _DTYPES:
        raise ExportError(f"sd35_medium: dtype must be one of {', '.join(_DTYPES)}, not {dtype!r}")
    cfg = transformer_config(setup.overrides, setup.config)
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype)
    direct = half is not None and _fp32_bytes(cfg) > _memory_bytes() / 2
    torch.manual_seed(setup.seed)
    if direct:
        # The fp32 weights would not fit beside their cast copy: draw them in the half dtype itself
        # (other values than draw-then-cast, the same distribution).
        previous = torch.get_default_dtype()
        torch.set_default_dtype(half)
        try:
            model = diffusers.SD3Transformer2DModel.from_config(cfg).eval()
        finally:
            torch.set_default_dtype(previous)
    else:
        model = diffusers.SD3Transformer2DModel.from_config(cfg).eval()
        if half is not None:
            model = model.to(half)
    return model


def _fp32_bytes(cfg: dict[str, Any]) -> int:
    """The transformer's fp32 weight bytes, counted on the meta device (nothing allocated)."""
    import diffusers
    import torch

    with torch.device("meta"):
        model = diffusers.SD3Transformer2DModel.from_config(cfg)
    return 4 * sum(p.numel() for p in model.parameters())


def _memory_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def call_inputs(setup: Setup) -> dict[str, np.ndarray]:
    """One CFG denoising call's seeded float32 inputs (the same in every subprocess)."""
    cfg = transformer_config(setup.overrides, setup.config)
    rng = np.random.default_rng(setup.seed + 1)
    f = 8  # the SD3 VAE's downscale
    if setup.height % (f * cfg["patch_size"]) or setup.width % (f * cfg["patch_size"]):
        raise ExportError(f"sd35_medium: {setup.height}x{setup.width} is not a multiple of {f * cfg['patch_size']}")
    sigma = np.float32(0.75)
    return {
        "sample": rng.standard_normal((setup.batch, cfg["in_channels"], setup.height // f, setup.width // f),
                                      dtype=np.float32),
        "timestep": np.full((setup.batch,), sigma * 1000, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal(
            (setup.batch, setup.clip_tokens + setup.t5_tokens, cfg["joint_attention_dim"]), dtype=np.float32),
        "pooled_projections": rng.standard_normal((setup.batch, cfg["pooled_projection_dim"]), dtype=np.float32),
    }


def _plan(model: Any, setup: Setup) -> Any:
    """The pipeline exporter's transformer plan (its wrapper, IO contract and symbolic dims),
    traced on a small example; a cast shim keeps the IO float32 around a half-precision model."""
    import torch

    from enginekit.export.diffusion.sd import _Plan, _wrappers
    from enginekit.manifest import TensorSpec

    cfg = model.config
    inner = _wrappers()["transformer"](model).eval()
    dtype = next(model.parameters()).dtype

    class Float32IO(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, sample, timestep, encoder_hidden_states, pooled_projections):  # type: ignore[no-untyped-def]
            return self.inner(sample.to(dtype), timestep, encoder_hidden_states.to(dtype),
                              pooled_projections.to(dtype)).float()

    module = inner if dtype == torch.float32 else Float32IO().eval()
    C, D, P, p = int(cfg.in_channels), int(cfg.joint_attention_dim), int(cfg.pooled_projection_dim), int(cfg.patch_size)
    gen = torch.Generator().manual_seed(setup.seed)
    example = (torch.randn(2, C, 4 * p, 6 * p, generator=gen), torch.rand(2, generator=gen) * 1000.0,
               torch.randn(2, 77 + 32, D, generator=gen), torch.randn(2, P, generator=gen))
    lat = ("batch", C, "latent_height", "latent_width")
    inputs = [TensorSpec("sample", "float32", lat), TensorSpec("timestep", "float32", ("batch",)),
              TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", D)),
              TensorSpec("pooled_projections", "float32", ("batch", P))]
    outputs = [TensorSpec("out_sample", "float32", ("batch", int(cfg.out_channels), "latent_height", "latent_width"))]
    n_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return _Plan("transformer", module, inputs, outputs, example, example, n_bytes)


def export_onnx(setup: Setup, work: Path, opset: int = 18) -> dict[str, Any]:
    """Build and export the transformer to ``work/onnx/transformer/model.onnx`` (+ ``.data``)."""
    import gc

    from enginekit.export.diffusion.sd import _name_dims, _torch_export

    started = time.perf_counter()
    direct = setup.dtype != "fp32" and _fp32_bytes(transformer_config(setup.overrides, setup.config)) > _memory_bytes() / 2
    model = build_transformer(setup, setup.dtype)
    built = time.perf_counter() - started
    gc.collect()
    memory = {"build_peak_gb": _gb(_hwm_bytes()), "after_build_gb": _gb(_rss_bytes())}
    _reset_hwm()  # from here VmHWM is the export's own peak
    plan = _plan(model, setup)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    path = work / _ONNX
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.iterdir():
        stale.unlink()
    exporter = _torch_export(plan, path, opset, external=True)
    _name_dims(path, plan)
    del plan
    gc.collect()
    files = {p.name: p.stat().st_size for p in sorted(path.parent.iterdir())}
    memory["export_peak_gb"] = _gb(_hwm_bytes())
    return {"exporter": exporter, "opset": opset, "dtype": setup.dtype, "parameters": n_params,
            "weights_drawn_in": setup.dtype if direct else "fp32" + (f", cast to {setup.dtype}" if setup.dtype != "fp32" else ""),
            **memory,
            "build_s": round(built, 1), "export_s": round(time.perf_counter() - started - built, 1), "files": files}


def _timed(fn: Any, setup: Setup) -> tuple[Any, dict[str, Any]]:
    """Warm-up calls, then up to ``repeats`` timed ones (fewer when the budget says so)."""
    times: list[float] = []
    warm: list[float] = []
    out = None
    for _ in range(setup.warmup):
        t = time.perf_counter()
        out = fn()
        warm.append((time.perf_counter() - t) * 1e3)
    repeats = setup.repeats
    while len(times) < repeats:
        t = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t) * 1e3)
        if len(times) == 1 and times[0] / 1e3 * repeats > setup.budget_s:
            repeats = max(1, int(setup.budget_s // (times[0] / 1e3)))
    return out, {"ms": round(float(np.median(times)), 1), "calls_ms": [round(x, 1) for x in times],
                 "warmup_ms": [round(x, 1) for x in warm]}


def run_torch(setup: Setup, work: Path) -> dict[str, Any]:
    """diffusers' transformer in PyTorch eager fp32 on the call's inputs."""
    import torch

    model = build_transformer(setup, "fp32")
    feeds = {k: torch.from_numpy(v) for k, v in call_inputs(setup).items()}
    with torch.inference_mode():
        out, stats = _timed(lambda: model(hidden_states=feeds["sample"], timestep=feeds["timestep"],
                                          encoder_hidden_states=feeds["encoder_hidden_states"],
                                          pooled_projections=feeds["pooled_projections"], return_dict=False)[0], setup)
    np.save(work / "out_pytorch.npy", out.float().numpy())
    return {**stats, "threads": torch.get_num_threads(), "precision": "fp32"}


def run_openvino(setup: Setup, work: Path) -> dict[str, Any]:
    """OpenVINO CPU: ``read_model`` on the ONNX file, ``compile_model`` with the device's default
    inference precision (bf16 on AMX for a half-precision model; f32 asked for an fp32 one, as the
    enginekit backend does)."""
    import openvino as ov
    import openvino.properties.hint as hints

    core = ov.Core()
    started = time.perf_counter()
    model = core.read_model(str(work / _ONNX))
    config = {hints.inference_precision(): ov.Type.f32} if setup.dtype == "fp32" else {}
    compiled = core.compile_model(model, "CPU", config)
    del model
    load_s = time.perf_counter() - started
    request = compiled.create_infer_request()
    feeds = call_inputs(setup)
    out, stats = _timed(lambda: request.infer(feeds)[compiled.output(0)].copy(), setup)
    np.save(work / "out_openvino.npy", np.asarray(out, dtype=np.float32))
    precision = compiled.get_property(hints.inference_precision())
    return {**stats, "load_s": round(load_s, 1), "precision": getattr(precision, "to_string", lambda: str(precision))()}


def run_onnxruntime(setup: Setup, work: Path) -> dict[str, Any]:
    """ONNX Runtime CPU on the exported file (fp32 exports only)."""
    import onnxruntime as ort

    started = time.perf_counter()
    session = ort.InferenceSession(str(work / _ONNX), providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - started
    feeds = call_inputs(setup)
    out, stats = _timed(lambda: session.run(["out_sample"], feeds)[0], setup)
    np.save(work / "out_onnxruntime.npy", out.astype(np.float32))
    return {**stats, "load_s": round(load_s, 1), "precision": "fp32"}


STAGES = {"export": export_onnx, "pytorch": run_torch, "openvino": run_openvino, "onnxruntime": run_onnxruntime}


def run_stage(stage: str, setup: Setup, work: Path, rss_limit: float, timeout_s: float) -> dict[str, Any]:
    """``stage`` in a fresh interpreter under an RSS watchdog: its result, peak RSS and wall time."""
    work.mkdir(parents=True, exist_ok=True)
    result_file = work / f"{stage}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.sd35_medium", "--stage", stage, "--work", str(work),
           "--setup", json.dumps(asdict(setup))]
    run = run_watched(cmd, rss_limit, timeout_s=timeout_s, env=child_env())
    peak, why = run.peak_rss_bytes, run.killed
    record: dict[str, Any] = {"stage": stage, "peak_rss_gb": round(peak / 2**30, 2), "wall_s": round(run.seconds, 1)}
    if why or run.returncode != 0 or not result_file.is_file():
        record["error"] = why or f"exited with {run.returncode}"
    else:
        record.update(json.loads(result_file.read_text()))
        record["polled_peak_rss_gb"] = record["peak_rss_gb"]
        record["peak_rss_gb"] = round(max(peak, record.pop("maxrss_bytes", 0)) / 2**30, 2)
    return record


def _status_bytes(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _hwm_bytes() -> int:
    """This process's resident high-water mark (``VmHWM``: the kernel's own peak, which the
    parent's 0.1 s polling can miss); 0 off Linux."""
    return _status_bytes("VmHWM")


def _rss_bytes() -> int:
    return _status_bytes("VmRSS")


def _reset_hwm() -> None:
    """Start VmHWM again from the current RSS (Linux: ``5`` to ``/proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _gb(n: int) -> float:
    return round(n / 2**30, 2)


def compare(work: Path, engine: str) -> dict[str, float]:
    """Cosine and max abs of ``engine``'s output against PyTorch's."""
    from enginekit.fidelity import cosine_similarity

    ref, got = np.load(work / "out_pytorch.npy"), np.load(work / f"out_{engine}.npy")
    return {"cosine": round(float(cosine_similarity(ref, got)), 6), "max_abs": float(np.abs(ref - got).max()),
            "ref_max_abs": float(np.abs(ref).max())}


def table(records: list[dict[str, Any]]) -> str:
    rows = ["| stage | precision | ms per call (median) | calls | peak RSS (GiB) | wall (s) | cosine vs PyTorch "
            "| max abs |",
            "|:---|:---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        if "error" in r:
            rows.append(f"| {r['stage']} | - | {r['error']} | - | {r['peak_rss_gb']} | {r['wall_s']} | - | - |")
            continue
        ms = r.get("ms", "-")
        calls = len(r.get("calls_ms", [])) or "-"
        cos = r.get("cosine", "-")
        mx = f"{r['max_abs']:.3g}" if "max_abs" in r else "-"
        rows.append(f"| {r['stage']} | {r.get('precision', r.get('dtype', '-'))} | {ms} | {calls} | "
                    f"{r['peak_rss_gb']} | {r['wall_s']} | {cos} | {mx} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="Folder for the ONNX file, outputs and JSON.")
    parser.add_argument("--dtype", default="fp32", choices=_DTYPES,
                        help="Weights cast to this before export (drawn in it where fp32 would not fit).")
    parser.add_argument("--config", default=CONFIG, choices=CONFIGS, help="Whose transformer (default sd35-medium).")
    parser.add_argument("--num-layers", type=int, help="Fewer transformer blocks (the RSS probe).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=180.0, help="Per side: fewer repeats past this.")
    parser.add_argument("--rss-limit-gb", type=float, default=18.0)
    parser.add_argument("--stage-timeout-s", type=float, default=3600.0)
    parser.add_argument("--skip", action="append", default=[], choices=list(STAGES), help="Leave a stage out.")
    parser.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:  # a child: one stage, its result as JSON
        raw = json.loads(args.setup)
        setup = Setup(**raw)
        result = STAGES[args.stage](setup, args.work)
        result["maxrss_bytes"] = _hwm_bytes()
        (args.work / f"{args.stage}.json").write_text(json.dumps(result))
        return
    setup = Setup(seed=args.seed, dtype=args.dtype, config=args.config, warmup=args.warmup, repeats=args.repeats, budget_s=args.budget_s,
                  overrides={"num_layers": args.num_layers} if args.num_layers else {})
    report = run_all(setup, args.work, rss_limit_gb=args.rss_limit_gb, timeout_s=args.stage_timeout_s,
                     skip=tuple(args.skip), on_record=lambda r: print(json.dumps(r), flush=True))
    print(report["table"])


def run_all(setup: Setup, work: Path, *, rss_limit_gb: float = 18.0, timeout_s: float = 3600.0,
            skip: tuple[str, ...] = (), on_record: Any = lambda r: None) -> dict[str, Any]:
    """Every stage in order; ``<work>/sd35_medium.json`` is rewritten after each one."""
    from enginekit.hardware import fingerprint

    work.mkdir(parents=True, exist_ok=True)
    stages = [s for s in ("export", "pytorch", "openvino", "onnxruntime") if s not in skip]
    if setup.dtype != "fp32" and "onnxruntime" in stages:
        stages.remove("onnxruntime")  # ONNX Runtime's CPU kernels are fp32; a half export is not timed there
    hw = fingerprint()
    report: dict[str, Any] = {"config": setup.config, "setup": asdict(setup),
                              "transformer_config": transformer_config(setup.overrides, setup.config),
                              "machine": {k: hw.get(k) for k in
                                          ("cpu_model", "logical_cores", "memory_bytes", "flags")},
                              "records": []}
    for stage in stages:
        record = run_stage(stage, setup, work, rss_limit_gb * 2**30, timeout_s)
        if stage in ("openvino", "onnxruntime") and "error" not in record and (work / "out_pytorch.npy").is_file():
            record.update(compare(work, stage))
        report["records"].append(record)
        on_record(record)
        (work / "sd35_medium.json").write_text(json.dumps(report, indent=2))
        if stage == "export" and "error" in record:
            break
    report["table"] = table(report["records"])
    (work / "sd35_medium.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    try:
        main()
    except EngineKitError as exc:
        raise SystemExit(f"error: {exc}") from exc
