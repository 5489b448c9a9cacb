"""What switching LoRA at run time costs: the ways of patching weights into an engine, timed.

    python benchmarks/lora_switch.py ARTIFACT [ARTIFACT ...] [--rank 16] [--steps 3]

For each artifact (an ONNX Runtime or OpenVINO text-to-image artifact with a lora_map.json) a
LoRA of the given rank on every attention projection of the denoiser (and the text encoder's
q/k/v/out) is written with numpy, then:

- ``apply``: the first call's extra time with the LoRA (the deltas, the patched engines opened);
- ``repeat``: a second call with the same LoRA (the cached engines: nothing rebuilt);
- ``step base`` / ``step lora``: one denoiser run of each engine (the patched engine must not be slower);
- ONNX Runtime only, the alternative ``add_initializer`` way (the graph read once, the patched
  tensors handed over as overriding initializers, at level "extended" where it works for Conv
  weights): the session's open time and one step.

Prints one markdown row per artifact; peak RSS from /proc (the process' high-water mark).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


def _lora(artifact: Path, path: Path, rank: int) -> Path:
    from safetensors.numpy import save_file

    maps = json.loads((artifact / "lora_map.json").read_text())["components"]
    rng = np.random.default_rng(0)
    tensors = {}
    for comp, modules in maps.items():
        for name, entry in modules.items():
            if name.endswith(("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")):
                out, inp = entry["shape"][:2]
                tensors[f"{comp}.{name}.lora_A.weight"] = (rng.standard_normal((rank, inp)) * 0.01).astype(np.float16)
                tensors[f"{comp}.{name}.lora_B.weight"] = (rng.standard_normal((out, rank)) * 0.01).astype(np.float16)
    save_file(tensors, str(path))
    return path


def _step(runner, feeds, n: int = 3) -> float:
    runner.run(feeds)
    started = time.perf_counter()
    for _ in range(n):
        runner.run(feeds)
    return (time.perf_counter() - started) / n


def _feeds(pipe, side: int) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for spec in pipe.components[pipe.config.denoiser].inputs:
        shape = [2 if isinstance(d, str) and "batch" in d else 77 if isinstance(d, str) and "sequence" in d
                 else 64 if isinstance(d, str) else d for d in spec.shape]
        if spec.name == "sample":
            shape = [2, shape[1], side // 8, side // 8]
        out[spec.name] = (rng.standard_normal(shape) if spec.dtype.startswith("float") else
                          np.full(shape, 500)).astype(spec.dtype)
    return out


def measure(artifact: Path, rank: int, steps: int, scratch: Path, alternative: bool = True) -> dict:
    import enginekit

    lora = _lora(artifact, scratch / f"bench-r{rank}.safetensors", rank)
    pipe = enginekit.load(artifact)
    side = pipe.config.default_size
    call = dict(num_inference_steps=steps, height=side, width=side, seed=0, output_type="np")
    row = {"artifact": artifact.name, "backend": pipe.backend, "rank": rank, "size": side}
    pipe("a lighthouse", **call)  # warm-up: every component opened
    t = time.perf_counter(); pipe("a lighthouse", **call); row["call base s"] = time.perf_counter() - t
    t = time.perf_counter(); pipe("a lighthouse", loras={lora: 0.8}, **call)
    row["apply s"] = time.perf_counter() - t - row["call base s"]
    t = time.perf_counter(); pipe("a lighthouse", loras={lora: 0.8}, **call)
    row["repeat s"] = time.perf_counter() - t - row["call base s"]
    feeds = _feeds(pipe, side)
    denoiser = pipe.config.denoiser
    row["step base s"] = _step(pipe.components[denoiser], feeds)
    (entry,) = pipe.lora_switch._cache.values()
    row["step lora s"] = _step(entry.runners[denoiser], feeds)
    if pipe.backend == "onnxruntime" and alternative:
        row.update(_add_initializer(pipe, lora, feeds))
    row["peak rss GiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    pipe.close()
    return row


def _add_initializer(pipe, lora: Path, feeds: dict) -> dict:
    """The other ONNX Runtime way: overriding initializers on a session of the unchanged file."""
    import onnxruntime as ort

    from enginekit.runtimes.lora_map import engine_tensors, to_graph_layout
    from enginekit.runtimes.lora_files import read_lora

    denoiser = pipe.config.denoiser
    layers = pipe.lora_switch.resolve(read_lora(lora))
    entries = pipe.lora_switch._weight_map()[denoiser]
    started = time.perf_counter()
    path = pipe.path / pipe.manifest.component(denoiser).entry
    mine = {m: e for (c, m), e in ((k, entries[k[1]]) for k in layers if k[0] == denoiser)}
    base = dict(engine_tensors(path, {e["tensor"] for e in mine.values()}))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    keep = []
    for m, e in mine.items():
        value = base[e["tensor"]]
        patched = (value + to_graph_layout(layers[(denoiser, m)].delta(0.8), e, value.shape)).astype(value.dtype)
        keep.append(ort.OrtValue.ortvalue_from_numpy(patched))
        so.add_initializer(e["tensor"], keep[-1])
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    opened = time.perf_counter() - started

    class _R:
        def run(self, f):
            return session.run(None, f)

    return {"add_initializer open s": opened, "add_initializer step s": _step(_R(), feeds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp"))
    parser.add_argument("--no-alternative", dest="alternative", action="store_false",
                        help="skip ONNX Runtime's add_initializer way (a third copy of the denoiser in memory)")
    args = parser.parse_args()
    rows = [measure(a, args.rank, args.steps, args.scratch, args.alternative) for a in args.artifacts]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
