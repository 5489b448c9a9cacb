"""The streaming export: components traced with fake weights, their weights streamed tensor by tensor
(from the per-tensor seeded generator or memory-mapped safetensors) into the data file. On every
tiny family it must give the in-memory export's graph bit for bit: the same initializers, and the
same ONNX Runtime outputs on the same inputs. Two tests run it in a child process on a pipeline
made wide enough (1.8 GB of fp32 weights): its peak RSS stays far below that, and it passes in a
memory cgroup capped at 1 GiB."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from enginekit.errors import SourceError
from enginekit.manifest import read_manifest

pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

from ._sd_single_file import write_ldm_checkpoint  # noqa: E402

# flux (the transformer family the streaming export is for) runs by default; the others under -m slow,
# which keeps the default suite's time (each family's in-memory twin export takes a while).
FAMILIES = (pytest.param("tiny-sd15", marks=pytest.mark.slow), pytest.param("tiny-sdxl", marks=pytest.mark.slow),
            pytest.param("tiny-sd3", marks=pytest.mark.slow), "tiny-flux")


def _canonical(model_path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """The graph with the exporter's numbered value names (``val_12``) replaced by their order of
    first use (the counter may start apart between two traces of the same module, and folded
    initializers may be listed in another order): its initializers by name, and its nodes as text."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
    names: dict[str, str] = {}

    def canon(name: str) -> str:
        if re.fullmatch(r"val_\d+", name):
            return names.setdefault(name, f"v{len(names)}")
        return name

    nodes = [f"{n.op_type} {[canon(i) for i in n.input]} -> {[canon(o) for o in n.output]} "
             f"{[str(a).replace(chr(10), ' ') for a in n.attribute if a.type != onnx.AttributeProto.GRAPH]}"
             for n in model.graph.node]
    inits = {canon(t.name): numpy_helper.to_array(t, base_dir=str(model_path.parent)) for t in model.graph.initializer}
    return inits, nodes


def _assert_same_artifact(streamed: Path, in_memory: Path, manifest) -> None:  # type: ignore[no-untyped-def]
    """Every component: the same graph, the same initializers bit for bit, the same outputs."""
    from enginekit.runtimes.onnxruntime import run_onnx_file

    today = read_manifest(in_memory)
    for name, comp in manifest.components.items():
        (got, got_nodes), (want, want_nodes) = _canonical(streamed / comp.entry), _canonical(in_memory / comp.entry)
        fallback = today.provenance["exporters"][name] == "torchscript"
        if fallback:
            # Today's export of T5 falls back to the TorchScript exporter (dynamo's decomposition trips on a
            # view of real strides); traced with fake weights it goes through dynamo. Another graph, so the
            # weights are checked against PyTorch's own and the outputs to float rounding below.
            _assert_weights_are_pytorchs(got, today.provenance["source"], name)
        else:
            assert got_nodes == want_nodes, name
            assert sorted(got) == sorted(want), name
            for key, b in want.items():
                a = got[key]
                assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), (name, key)
        rng = np.random.default_rng(0)
        feeds = {}  # at the shapes today's parity check ran (recorded in its manifest)
        for key, spec in read_manifest(in_memory).components[name].fidelity["inputs"].items():
            if spec["dtype"] == "int64":
                feeds[key] = rng.integers(0, 100, size=spec["shape"]).astype(np.int64)
            else:
                feeds[key] = rng.standard_normal(spec["shape"]).astype(np.float32)
        out_s, out_m = run_onnx_file(streamed / comp.entry, feeds), run_onnx_file(in_memory / comp.entry, feeds)
        # A streamed UNet lacks the in-memory one's deep_cache (torch.export cannot give it out).
        assert set(out_s) <= set(out_m) and "out_sample" in out_s or name != "unet", (name, sorted(out_s))
        for key in [k for k in out_m if k in out_s]:
            if fallback:
                np.testing.assert_allclose(out_s[key], out_m[key], rtol=0, atol=1e-5 * float(np.abs(out_m[key]).max()),
                                           err_msg=f"{name}.{key}")
            else:
                np.testing.assert_array_equal(out_s[key], out_m[key], err_msg=f"{name}.{key}")


def _assert_weights_are_pytorchs(initializers: dict[str, np.ndarray], source: str, name: str) -> None:
    """Each initializer named after a parameter holds exactly that parameter of the in-memory build."""
    from enginekit.export.diffusion.sources import resolve_pipeline

    module = getattr(resolve_pipeline(source).pipeline, name)
    state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    # Named after the wrapper's attribute, then the component's state-dict name.
    named = [(k.split(".", 1)[1], a) for k, a in initializers.items() if "." in k and k.split(".", 1)[1] in state]
    assert named, name
    for key, array in named:
        assert np.array_equal(array, state[key]), (name, key)


def test_seeded_weights_are_drawn_per_tensor() -> None:
    """The same (seed, component, name) gives the same tensor whatever else is drawn; the in-memory
    builder (reseed_) and the streaming source give identical weights."""
    import torch

    from enginekit.export.diffusion.streaming import SeededWeights, reseed_, seeded_tensor

    a = seeded_tensor(0, "unet", "conv_in.weight", (8, 4, 3, 3))
    seeded_tensor(0, "unet", "conv_in.bias", (8,))
    assert torch.equal(a, seeded_tensor(0, "unet", "conv_in.weight", (8, 4, 3, 3)))
    assert not torch.equal(a, seeded_tensor(1, "unet", "conv_in.weight", (8, 4, 3, 3)))
    assert not torch.equal(a, seeded_tensor(0, "vae", "conv_in.weight", (8, 4, 3, 3)))
    assert float(a.abs().max()) <= 1 / 6  # ±1/sqrt(fan_in), fan_in 36
    norm = seeded_tensor(0, "unet", "norm.weight", (8,))
    assert float(norm.min()) >= 0.9 and float(norm.max()) <= 1.1

    layer = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    reseed_(layer, 5, "text_encoder")
    source = SeededWeights(5, "text_encoder")
    for name, param in layer.named_parameters():
        assert torch.equal(param.detach(), source.get((name,), tuple(param.shape)))


def test_empty_pipeline_holds_no_weights() -> None:
    """A streaming source's components are fake: no parameter has storage, buffers are real."""
    from torch._subclasses.fake_tensor import is_fake

    from enginekit.export.diffusion.sources import resolve_pipeline

    src = resolve_pipeline("tiny-sd15", empty_weights=True)
    assert set(src.weights) == {"text_encoder", "unet", "vae"}
    for name in src.weights:
        module = getattr(src.pipeline, name)
        assert all(is_fake(p) for p in module.parameters())
        assert not any(is_fake(b) for b in module.buffers())


class _InMemory(dict):  # type: ignore[type-arg]
    """Today's export of a tiny family (parity-checked against PyTorch; no image check), made
    on first use: ``in_memory[name]`` is its folder."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> Path:
        from enginekit.export.diffusion.sd import PipelineExportOptions, export_pipeline

        export_pipeline(name, self.root / name, PipelineExportOptions(image_check=False))
        self[name] = self.root / name
        return self[name]


@pytest.fixture(scope="module")
def in_memory(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _InMemory(tmp_path_factory.mktemp("in-memory"))


@pytest.mark.parametrize("name", FAMILIES)
def test_streamed_seeded_export_is_bit_identical(name: str, in_memory: dict[str, Path], tmp_path: Path) -> None:
    from enginekit.export.diffusion.sd import PipelineExportOptions, export_pipeline

    manifest = export_pipeline(name, tmp_path / "s", PipelineExportOptions(streaming=True))
    _assert_same_artifact(tmp_path / "s", in_memory[name], manifest)
    assert manifest.provenance["streamed"] is True
    assert manifest.fidelity["image"]["checked"] is False
    for comp in manifest.components.values():
        assert comp.fidelity["streamed"] is True and comp.fidelity["checked"] is True
        assert comp.fidelity["method"] == "per-block" and comp.fidelity["passed"] is True
        assert comp.fidelity["weights"] == "seeded per tensor (seed 0)"
        assert manifest.fidelity["components"][comp.name]["streamed"] is True
        assert any(f.path.endswith("model.onnx.data") for f in comp.files)


@pytest.mark.slow  # bf16 storage (50 s on 2 cores; int8/int4 streaming stay in the default suite): runs with -m slow
def test_streamed_bf16_is_the_float_export_stored_in_bf16(in_memory: dict[str, Path], tmp_path: Path) -> None:
    """``--streaming --weight-format bf16``: each weight rounded to bf16 as it is drawn, the same files
    as storing today's float export in bf16 (the transformer, dynamo on both sides), and each block
    checked against PyTorch fp32 under the bf16 budget."""
    from enginekit.export.compress import WeightFormat, compress_component
    from enginekit.export.diffusion.sd import PipelineExportOptions, export_pipeline

    manifest = export_pipeline("tiny-flux", tmp_path / "s", PipelineExportOptions(streaming=True, weight_format="bf16"))
    assert {n: c.precision for n, c in manifest.components.items()} == {
        "text_encoder": "fp32", "text_encoder_2": "bf16", "transformer": "bf16", "vae_decoder": "fp32",
        "vae_encoder": "fp32"}
    compress_component(in_memory["tiny-flux"] / "transformer", WeightFormat("bf16"), tmp_path / "r")
    (got, got_nodes), (want, want_nodes) = (_canonical(tmp_path / "s" / "transformer" / "model.onnx"),
                                            _canonical(tmp_path / "r" / "model.onnx"))
    assert got_nodes == want_nodes and sorted(got) == sorted(want)
    for key in want:
        assert np.array_equal(got[key], want[key]), key
    for name in ("transformer", "text_encoder_2"):
        fidelity = manifest.components[name].fidelity
        assert fidelity["weight_format"] == "bf16" and fidelity["passed"] is True, name
        assert manifest.components[name].quantization["tensors_bf16"] > 0


def _hub_clip_keys(path: Path) -> None:
    """Rewrite a CLIPTextModel's weights with the "text_model." prefix hub checkpoints (transformers 4)
    store them under; transformers 5 saves them without it."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path))
    save_file({(k if k.startswith("text_model.") else "text_model." + k): v for k, v in weights.items()}, str(path),
              metadata={"format": "pt"})


def test_streamed_weights_found_under_a_checkpoints_own_prefix(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from enginekit.export.diffusion.streaming import SafetensorsWeights

    save_file({"text_model.encoder.w": torch.ones(2, 3), "text_projection.weight": torch.zeros(3)},
              str(tmp_path / "model.safetensors"))
    weights = SafetensorsWeights(tmp_path)
    assert weights.get(("encoder.w",), (2, 3)).sum() == 6  # transformers 5's name, the hub's key
    assert weights.get(("text_model.text_projection.weight",), (3,)).shape == (3,)
    with pytest.raises(SourceError, match="no weight 'encoder.v'"):
        weights.get(("encoder.v",), (2, 3))


@pytest.mark.slow
@pytest.mark.parametrize("name", ("tiny-sd15", "tiny-flux"))
def test_streamed_from_safetensors_folder(name: str, in_memory: dict[str, Path], tmp_path: Path) -> None:
    """A save_pretrained folder (one component sharded, with its index) streams to the same artifact."""
    from enginekit.export.diffusion.sd import PipelineExportOptions, export_pipeline
    from enginekit.export.diffusion.sources import resolve_pipeline

    folder = tmp_path / "pipe"
    pipe = resolve_pipeline(name).pipeline
    pipe.save_pretrained(folder, safe_serialization=True)
    denoiser = "transformer" if (folder / "transformer").is_dir() else "unet"
    getattr(pipe, denoiser).save_pretrained(folder / denoiser, safe_serialization=True, max_shard_size="20KB")
    for stale in (folder / denoiser).glob("diffusion_pytorch_model.safetensors"):
        stale.unlink()
    assert (folder / denoiser / "diffusion_pytorch_model.safetensors.index.json").is_file()
    del pipe
    _hub_clip_keys(folder / "text_encoder" / "model.safetensors")

    manifest = export_pipeline(str(folder), tmp_path / "s", PipelineExportOptions(streaming=True))
    _assert_same_artifact(tmp_path / "s", in_memory[name], manifest)
    assert manifest.components[denoiser].fidelity["weights"].startswith("safetensors (")


@pytest.mark.slow
@pytest.mark.parametrize("builtin,family", [("tiny-sd15", "sd15"), ("tiny-sdxl", "sdxl")])
def test_streamed_from_single_file(builtin: str, family: str, in_memory: dict[str, Path], tmp_path: Path) -> None:
    """An LDM single file: each weight converted on the way as diffusers converts it (renames, the
    VAE attention's 1x1 convs, OpenCLIP's fused q/k/v) gives the in-memory export of the same weights."""
    from enginekit.export.diffusion.sd import PipelineExportOptions, export_pipeline
    from enginekit.export.diffusion.sources import config_dir, resolve_pipeline

    path = write_ldm_checkpoint(resolve_pipeline(builtin).pipeline, family, tmp_path / "model.safetensors")
    src = resolve_pipeline(str(path), family=family, config=config_dir(builtin), empty_weights=True)
    manifest = export_pipeline(src, tmp_path / "s", PipelineExportOptions(streaming=True))
    _assert_same_artifact(tmp_path / "s", in_memory[builtin], manifest)
    assert manifest.components["unet"].fidelity["weights"] == "single-file safetensors (model.safetensors)"


def test_streaming_never_unpickles(tmp_path: Path) -> None:
    from enginekit.export.diffusion.sources import resolve_pipeline

    folder = tmp_path / "pipe"
    resolve_pipeline("tiny-sd15").pipeline.save_pretrained(folder, safe_serialization=True)
    for p in (folder / "unet").glob("*.safetensors"):
        p.rename(p.with_suffix(".bin"))
    with pytest.raises(SourceError, match="never unpickles"):
        resolve_pipeline(str(folder), empty_weights=True)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"")
    with pytest.raises(SourceError, match="never loaded"):
        resolve_pipeline(str(ckpt), family="sd15", empty_weights=True)


def test_streaming_refusals(tmp_path: Path) -> None:
    """What streaming cannot do is refused in one line: a source that holds its weights, LoRA fusing."""
    from enginekit.errors import ExportError
    from enginekit.export.diffusion.lora import LoraSpec
    from enginekit.export.diffusion.sd import PipelineExportOptions, export_pipeline
    from enginekit.export.diffusion.sources import resolve_pipeline

    with pytest.raises(ExportError, match="needs a source built with empty weights"):
        export_pipeline(resolve_pipeline("tiny-sd15"), tmp_path / "a", PipelineExportOptions(streaming=True))
    with pytest.raises(ExportError, match="LoRA files are fused into loaded weights"):
        export_pipeline("tiny-sd15", tmp_path / "b",
                        PipelineExportOptions(streaming=True, loras=(LoraSpec(tmp_path / "x.safetensors"),)))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_streaming_cli_flag(in_memory: dict[str, Path], tmp_path: Path) -> None:
    """``export --streaming`` writes an artifact that loads and generates today's image."""
    from click.testing import CliRunner

    import enginekit
    from enginekit.app.cli import cli

    out = tmp_path / "a"
    result = CliRunner().invoke(cli, ["export", "tiny-sd15", "-o", str(out), "--streaming"])
    assert result.exit_code == 0, result.output
    assert "weights streamed, checked block by block vs PyTorch" in " ".join(result.output.split())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["provenance"]["streamed"] is True
    assert all(c["fidelity"]["streamed"] for c in manifest["components"].values())
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    images = [enginekit.load(path, device="cpu")("a lighthouse", num_inference_steps=2, height=64, width=64,
                                                  latents=latents, output_type="np").images
              for path in (out, in_memory["tiny-sd15"])]
    np.testing.assert_array_equal(images[0], images[1])


# --------------------------------------------------------------------------- memory cap

_WIDE_CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    from enginekit.export.diffusion.sd import PipelineExportOptions, _plans
    from enginekit.export.diffusion.sources import _build_seeded
    from enginekit.export.diffusion.streaming import export_streamed

    def vm(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    config, out = Path(sys.argv[1]), Path(sys.argv[2])
    src = _build_seeded(config, "flux", 0, empty=True)
    weights = sum(p.numel() * 4 for p in src.pipeline.transformer.parameters())
    make = [m for m in _plans(src.pipeline, "flux", PipelineExportOptions()) if m.__name__ == "transformer"][0]
    plan = make()
    fmt = None
    if sys.argv[3] != "fp32":
        from enginekit.export.compress import WeightFormat
        fmt = WeightFormat(sys.argv[3])
    before = vm("VmRSS")
    out.mkdir()
    export_streamed(plan, out / "model.onnx", 18, src.pipeline, src.weights, fmt)
    print(json.dumps({"weights": weights, "before": before, "peak": vm("VmHWM")}))
""")


def _wide_flux_config(tmp_path: Path) -> Path:
    """tiny-flux with a 2048-wide transformer, 2 + 2 blocks: 1.8 GB of fp32 weights."""
    from enginekit.export.diffusion.sources import config_dir

    folder = tmp_path / "wide-flux"
    shutil.copytree(config_dir("tiny-flux"), folder)
    cfg_path = folder / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(num_attention_heads=128, num_layers=2, num_single_layers=2)
    cfg_path.write_text(json.dumps(cfg))
    return folder


@pytest.mark.slow  # int4 runs by default under the memory cap (below)
@pytest.mark.parametrize("fmt", ("int4", "fp32"))
def test_streamed_export_peak_memory_is_far_below_the_weights(tmp_path: Path, fmt: str) -> None:
    """A FLUX transformer with 1.8 GB of fp32 weights exports with the child's peak RSS growing by
    under a third of that (its largest tensor is 84 MB); the in-memory path holds all of it at least once.
    int4: each weight compressed as it is drawn, the data file a fraction of the fp32 weights."""
    config = _wide_flux_config(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _WIDE_CHILD, str(config), str(tmp_path / "out"), fmt],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    numbers = json.loads(proc.stdout.strip().splitlines()[-1])
    assert numbers["weights"] > 1.5e9
    # Measured 0.32 GB of growth for 1.8 GB of weights (the trace, and the largest tensor drawn and written).
    assert numbers["peak"] - numbers["before"] < numbers["weights"] / 3, numbers
    data = tmp_path / "out" / "model.onnx.data"
    if fmt == "fp32":
        assert data.stat().st_size >= numbers["weights"]
    else:  # 4 bits and a scale and zero point per 128 weights (the first and last layers int8)
        assert data.stat().st_size < numbers["weights"] / 5


class _MemoryCap:
    """A memory cgroup of its own with a hard limit (v1 ``memory.limit_in_bytes`` or v2
    ``memory.max``); ``enter`` is a ``preexec_fn`` that moves the child into it. None where this
    machine lets no cgroup be made (not root, no memory controller): the test then skips."""

    def __init__(self, folder: Path, limit_file: str, limit: int) -> None:
        self.folder, self.limit_file = folder, limit_file
        (folder / limit_file).write_text(str(limit))

    @classmethod
    def make(cls, limit: int) -> "_MemoryCap | None":
        name = f"enginekit-test-{os.getpid()}-{os.urandom(3).hex()}"
        candidates = [(Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes")]
        root = Path("/sys/fs/cgroup")
        controllers = root / "cgroup.controllers"
        if controllers.exists() and "memory" in controllers.read_text().split():
            candidates.append((root, "memory.max"))
        for base, limit_file in candidates:
            if not (base / "cgroup.procs").exists():
                continue
            try:
                (base / name).mkdir()
            except OSError:
                continue
            try:
                return cls(base / name, limit_file, limit)
            except OSError:
                (base / name).rmdir()
        return None

    def enter(self) -> None:
        (self.folder / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> None:
        try:
            self.folder.rmdir()
        except OSError:
            pass


def test_streamed_export_runs_under_a_memory_cap_below_the_weights(tmp_path: Path) -> None:
    """The issue's cap: a transformer with 1.8 GB of fp32 weights exports, streamed and compressed to int4,
    in a memory cgroup capped at 1 GiB (anonymous memory and page cache together). A child that
    allocates 1.5 GiB in the same cap is killed: the cap is real."""
    cap = _MemoryCap.make(2**30)
    if cap is None:  # the same export uncapped, its peak measured, is test_streamed_export_peak_memory_... (slow)
        pytest.skip("no memory cgroup can be made here (needs root and a memory controller)")
    try:
        config = _wide_flux_config(tmp_path)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        hog = subprocess.run([sys.executable, "-c", "import numpy as np; a = np.ones(3 * 2**30 // 16); "
                              "print(a.sum())"], capture_output=True, text=True, timeout=120, preexec_fn=cap.enter)
        assert hog.returncode != 0, "a 1.5 GiB allocation ran under the 1 GiB cap: the cap does not hold here"
        proc = subprocess.run([sys.executable, "-c", _WIDE_CHILD, str(config), str(tmp_path / "out"), "int4"],
                              capture_output=True, text=True, timeout=600, env=env, preexec_fn=cap.enter)
        assert proc.returncode == 0, proc.stderr[-3000:]
        numbers = json.loads(proc.stdout.strip().splitlines()[-1])
        assert numbers["weights"] > 1.5 * 2**30
        # The child's own peak grows by far less than the weights (measured 0.32 GB uncapped).
        assert numbers["peak"] - numbers["before"] < numbers["weights"] / 3, numbers
        assert 0 < (tmp_path / "out" / "model.onnx.data").stat().st_size < numbers["weights"] / 5
    finally:
        cap.remove()
