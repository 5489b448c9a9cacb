"""``load(..., low_memory=True)``: each component open only for its step, the same images, and
the peak resident memory of each step (enginekit.memory) that ``generate -v`` prints."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import enginekit
from enginekit.app.cli import cli
from enginekit.errors import BackendError, InputError
from enginekit.memory import PeakRSS, StagePeaks, reset_peak

from ..conftest import backend_params, installed_backends, make_photo

# By default each backend with one pipeline shape (ONNX Runtime with a UNet, OpenVINO with a
# transformer and T5); every other pair (same code paths) under -m slow, for the suite's time.
_DEFAULT_PAIRS = {("onnxruntime", "tiny-sd15"), ("openvino", "tiny-flux")}
PAIRS = [pytest.param(b, n, id=f"{b}-{n}", marks=() if (b, n) in _DEFAULT_PAIRS else pytest.mark.slow)
         for n in ("tiny-sd15", "tiny-sdxl", "tiny-sd3", "tiny-flux") for b in ("onnxruntime", "openvino")]
ARGS = dict(prompt="a lighthouse at dusk", num_inference_steps=2, seed=3, output_type="np")


def _need(backend: str) -> None:
    if backend not in installed_backends():
        pytest.skip(f"backend {backend} is not installed here")


def _pair(tiny_pipelines: dict, name: str, backend: str) -> tuple:
    _need(backend)
    art = tiny_pipelines[(name, backend)]
    return enginekit.load(art, device="cpu"), enginekit.load(art, device="cpu", low_memory=True)


class _Events:
    """Which components a low-memory pipeline opens and closes, in order."""

    def __init__(self, pipe) -> None:  # noqa: ANN001
        self.log: list[tuple[str, str, tuple[str, ...]]] = []
        comps = pipe.components
        load, release = comps.backend.load_low_memory, comps.release

        def opened(root, manifest, device, name):  # noqa: ANN001, ANN202
            runner = load(root, manifest, device, name)
            self.log.append(("open", name, comps.loaded))  # what was open beside it
            return runner

        def released(*names: str) -> None:
            for name in names:
                if name in comps.loaded:
                    self.log.append(("close", name, ()))
            release(*names)

        comps.backend.load_low_memory = opened
        comps.release = released

    def index(self, what: str, name: str) -> int:
        return next(i for i, e in enumerate(self.log) if e[:2] == (what, name))


@pytest.mark.parametrize(("backend", "name"), PAIRS)
def test_low_memory_gives_the_same_image(tiny_pipelines: dict, name: str, backend: str) -> None:
    normal, low = _pair(tiny_pipelines, name, backend)
    want = normal(**ARGS).images
    first = low(**ARGS).images
    np.testing.assert_array_equal(first, want)
    assert low.components.loaded == ()  # nothing held between calls
    np.testing.assert_array_equal(low(**ARGS).images, want)  # and the next call opens them again
    assert set(normal.components.loaded) >= {normal.config.denoiser, "vae_decoder"}  # the default keeps them


@pytest.mark.parametrize("backend", backend_params())
def test_one_step_at_a_time_t5_freed_before_the_transformer_opens(tiny_pipelines: dict, backend: str) -> None:
    _, low = _pair(tiny_pipelines, "tiny-sd3", backend)
    events = _Events(low)
    low(**ARGS)
    encoders = [e.component for e in low.config.text_encoders]
    assert len(encoders) == 3
    for i, enc in enumerate(encoders):  # one text encoder open at a time, each closed after its run
        assert events.index("close", enc) < events.index("open", encoders[i + 1]) if i + 1 < len(encoders) else True
    t5 = encoders[-1]
    assert events.index("close", t5) < events.index("open", "transformer")
    assert events.index("close", "transformer") < events.index("open", "vae_decoder")
    assert all(beside == () for what, _, beside in events.log if what == "open"), events.log
    assert "vae_encoder" not in [n for _, n, _ in events.log]


def test_flux_true_cfg_keeps_the_encoders_for_the_negative_pass(tiny_pipelines: dict) -> None:
    normal, low = _pair(tiny_pipelines, "tiny-flux", "onnxruntime")
    args = dict(ARGS, negative_prompt="blurry", true_cfg_scale=2.0)
    events = _Events(low)
    np.testing.assert_array_equal(low(**args).images, normal(**args).images)
    opened = [n for what, n, _ in events.log if what == "open"]
    assert opened.count("text_encoder_2") == 1  # not opened twice for the second pass
    assert events.index("close", "text_encoder_2") < events.index("open", "transformer")


@pytest.mark.parametrize("backend", backend_params())
def test_image_to_image_closes_the_vae_encoder_before_denoising(tiny_pipelines: dict, backend: str,
                                                                tmp_path: Path) -> None:
    normal, low = _pair(tiny_pipelines, "tiny-sd15", backend)
    photo = tmp_path / "p.png"
    make_photo((64, 64), 0).save(photo)
    args = dict(ARGS, image=str(photo), strength=0.6)
    events = _Events(low)
    np.testing.assert_array_equal(low(**args).images, normal(**args).images)
    assert events.index("close", "vae_encoder") < events.index("open", "unet")
    assert low.components.loaded == ()


@pytest.mark.parametrize("backend", backend_params())
def test_low_memory_good_bad_good_gives_the_same_image(tiny_pipelines: dict, backend: str) -> None:
    _, low = _pair(tiny_pipelines, "tiny-sd15", backend)
    args = dict(ARGS, guidance_scale=5.0)
    first = low(**args).images

    def corrupt(component: str, feeds: dict) -> None:  # a batch that does not match the latents
        if component == "unet":
            feeds["encoder_hidden_states"] = np.concatenate([feeds["encoder_hidden_states"]] * 2)[:3]

    low.recorder = corrupt
    with pytest.raises(BackendError, match=f"^{backend} component 'unet' failed: "):
        low(**args)
    assert low.components.loaded == ()  # the failed call released what it had opened
    low.recorder = None
    np.testing.assert_array_equal(low(**args).images, first)


def test_decode_alone_and_concurrent_calls(tiny_pipelines: dict) -> None:
    normal, low = _pair(tiny_pipelines, "tiny-sd15", "onnxruntime")
    latents = normal(**dict(ARGS, output_type="latent")).images
    assert low(**dict(ARGS, output_type="latent")).images.tolist() == latents.tolist()
    np.testing.assert_array_equal(low.decode(latents), normal.decode(latents))
    assert low.components.loaded == ()
    want = normal(**ARGS).images
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(low(**ARGS).images)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(got) == 2  # one at a time: neither closed what the other was running
    for images in got:
        np.testing.assert_array_equal(images, want)


def test_low_memory_must_be_a_bool(tiny_pipelines: dict) -> None:
    with pytest.raises(InputError, match="low_memory must be True or False"):
        enginekit.load(tiny_pipelines[("tiny-sd15", "onnx")], low_memory="yes")


def test_onnxruntime_low_memory_session_settings(tiny_pipelines: dict) -> None:
    _need("onnxruntime")
    normal, low = _pair(tiny_pipelines, "tiny-sd15", "onnxruntime")
    lean = low.components["unet"]._session.get_session_options()
    default = normal.components["unet"]._session.get_session_options()
    assert (lean.enable_cpu_mem_arena, lean.enable_mem_pattern) == (True, False)
    assert (default.enable_cpu_mem_arena, default.enable_mem_pattern) == (True, True)


def test_openvino_low_memory_reads_weights_memory_mapped(tiny_pipelines: dict, monkeypatch) -> None:  # noqa: ANN001
    _need("openvino")
    import openvino.properties as props

    _, low = _pair(tiny_pipelines, "tiny-sd15", "openvino")
    core = low.components.backend._core()
    seen: list[dict] = []
    compile_model = core.compile_model
    monkeypatch.setattr(core, "compile_model", lambda *a: seen.append(dict(a[2])) or compile_model(*a), raising=False)
    low.components["unet"]
    assert seen and seen[0].get(props.enable_mmap()) is True


def test_openvino_low_memory_load_reads_the_blob_compile_cached(tiny_pipelines: dict, tmp_path) -> None:  # noqa: ANN001
    """The model cache's key includes the load's config: a low-memory load must hit the blob
    `compile` (a normal load) wrote, not compile and store a second one."""
    _need("openvino")
    from enginekit.artifact import using_cache_root

    with using_cache_root(tmp_path / "cache"):
        art = tiny_pipelines[("tiny-sd15", "openvino")]
        normal = enginekit.load(art, device="cpu")
        assert normal.components["unet"].loaded_from_cache is False
        blobs = sorted(p.name for p in (tmp_path / "cache").rglob("*.blob"))
        low = enginekit.load(art, device="cpu", low_memory=True)
        assert low.components["unet"].loaded_from_cache is True
        assert sorted(p.name for p in (tmp_path / "cache").rglob("*.blob")) == blobs


def _mapped_rss(*folders: Path) -> int:
    """Resident bytes of this process's file maps under ``folders`` (from /proc/self/smaps)."""
    roots = [str(Path(f).resolve()) for f in folders]
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's first line
            inside = len(head) >= 6 and any(head[5].startswith(r + "/") for r in roots)
        elif inside and line.startswith("Rss:"):
            total += int(head[1]) * 1024
    return total


def test_openvino_gives_back_mapped_weights_after_the_first_inference(tiny_pipelines: dict, tmp_path: Path) -> None:
    """The CPU plugin reads the IR (or cached blob) once, into its own memory, on load and first call;
    the mapped pages are given back then (what a later call reads in place maps again: a few
    small constants here), and a later call still gives the same output."""
    _need("openvino")
    from enginekit.artifact import using_cache_root

    art = Path(tiny_pipelines[("tiny-flux", "openvino")])
    with using_cache_root(tmp_path / "cache"):
        pipe = enginekit.load(art, device="cpu")
        first = pipe(**ARGS).images
        weights = sum(p.stat().st_size for p in [*art.rglob("*.bin"), *(tmp_path / "cache").rglob("*.blob")])
        assert weights > 2**20
        assert _mapped_rss(art, tmp_path / "cache") < weights / 16
        np.testing.assert_array_equal(pipe(**ARGS).images, first)
        pipe.close()


def test_openvino_conversion_is_convert_model_s(tiny_pipelines: dict, tmp_path: Path) -> None:
    """compile converts ONNX in two steps (the front end, then ovc's transformations) so mapped pages
    can be given back while it runs: the IR's weights are convert_model's, byte for byte."""
    _need("openvino")
    import openvino as ov

    from enginekit.runtimes.openvino_convert import convert_onnx

    onnx = Path(tiny_pipelines[("tiny-flux", "onnx")]) / "transformer" / "model.onnx"
    ov.save_model(ov.convert_model(str(onnx)), str(tmp_path / "a.xml"), compress_to_fp16=False)
    ov.save_model(convert_onnx(ov.Core(), onnx), str(tmp_path / "b.xml"), compress_to_fp16=False)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    a, b = ov.Core().read_model(str(tmp_path / "a.xml")), ov.Core().read_model(str(tmp_path / "b.xml"))
    assert [o.get_partial_shape() for o in a.outputs] == [o.get_partial_shape() for o in b.outputs]
    assert sorted(op.get_type_name() for op in a.get_ops()) == sorted(op.get_type_name() for op in b.get_ops())


def test_release_file_pages_gives_back_a_read_only_map_and_keeps_its_contents(tmp_path: Path) -> None:
    import mmap

    from enginekit.memory import ReleasingFilePages, release_file_pages

    data = np.random.default_rng(0).integers(0, 255, 48 * 2**20, dtype=np.uint8)
    path = tmp_path / "weights.bin"
    data.tofile(path)
    with open(path, "rb") as f:
        ro = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = np.frombuffer(ro, dtype=np.uint8)
    assert int(view.sum()) == int(data.sum())  # every page read
    assert _mapped_rss(tmp_path) >= 40 * 2**20
    assert release_file_pages([tmp_path]) >= 48 * 2**20
    assert _mapped_rss(tmp_path) < 2**20
    np.testing.assert_array_equal(view, data)  # read again from the file
    with ReleasingFilePages([path], every=0.01):
        assert int(view.sum()) == int(data.sum())
    assert _mapped_rss(tmp_path) < 2**20
    del view
    ro.close()
    # A writable map is never touched: its pages may hold what the file does not yet.
    with open(path, "r+b") as f:
        rw = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_WRITE)
    rw[:4] = b"edit"
    assert release_file_pages([path]) == 0
    assert rw[:4] == b"edit"
    rw.close()
    assert release_file_pages([tmp_path / "nothing-here"]) == 0


# ---------------------------------------------------------------------------- memory readers

def test_stage_peaks_see_each_stage_s_own_peak() -> None:
    peaks = StagePeaks()
    with peaks.stage("big"):
        block = np.ones(96 * 2**20 // 8)  # 96 MiB, every page touched
        del block
    with peaks.stage("small"):
        pass
    big, small = peaks.stages["big"], peaks.stages["small"]
    assert big.bytes is not None and small.bytes is not None
    if big.how == "vmhwm":  # exact where the mark resets: the block counts in its stage only
        assert big.bytes - small.bytes > 80 * 2**20
    assert peaks.line().startswith("peak RSS: big ") and ", small " in peaks.line()


def test_a_span_falls_back_to_sampling_where_the_mark_cannot_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    from enginekit import memory

    monkeypatch.setattr(memory, "reset_peak", lambda: False)
    with PeakRSS(reset=True, sample_s=0.001) as peak:
        block = np.ones(50 * 2**20 // 8)
        peak.sample()  # the caller's own sample at its peak moment (no timing involved)
    assert peak.how == "sampled" and peak.bytes is not None and peak.bytes > 50 * 2**20
    assert float(block[0]) == 1.0


def test_clear_refs_resets_the_high_water_mark_here() -> None:
    if not reset_peak():
        pytest.skip("this kernel does not let a process reset its VmHWM")
    from enginekit.memory import rss_bytes, vm_hwm_bytes

    block = np.ones(64 * 2**20 // 8)
    del block
    assert reset_peak()
    hwm, rss = vm_hwm_bytes(), rss_bytes()
    assert hwm is not None and rss is not None and hwm < rss + 32 * 2**20


# ---------------------------------------------------------------------------- the CLI

def test_generate_low_memory_verbose_prints_each_step_s_peak(tiny_pipelines: dict, tmp_path: Path) -> None:
    art = str(tiny_pipelines[("tiny-flux", "onnx")])
    common = ["--steps", "2", "--seed", "5", "--height", "64", "--width", "64"]
    plain = CliRunner().invoke(cli, ["generate", art, "a fox", "-o", str(tmp_path / "a.png"), *common])
    assert plain.exit_code == 0, plain.output
    assert "peak RSS" not in plain.output
    low = CliRunner().invoke(cli, ["generate", art, "a fox", "-o", str(tmp_path / "b.png"), "--low-memory", "-v",
                                   *common])
    assert low.exit_code == 0, low.output
    line = next(ln for ln in low.output.splitlines() if ln.startswith("peak RSS: "))
    assert line.index("text encoding ") < line.index("denoising ") < line.index("decode ") and "GiB" in line
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    as_json = CliRunner().invoke(cli, ["-v", "generate", art, "a fox", "-o", str(tmp_path / "c.png"), "--json",
                                       *common])
    report = json.loads(as_json.output[as_json.output.index("{"):])
    assert set(report["peak_rss_bytes"]) == {"text encoding", "denoising", "decode"}
    assert all(isinstance(v, int) and v > 0 for v in report["peak_rss_bytes"].values())


def test_compile_prints_its_peak(tiny_pipelines: dict, tmp_path: Path) -> None:
    backend = installed_backends()[0]
    result = CliRunner().invoke(cli, ["compile", str(tiny_pipelines[("tiny-sd15", "onnx")]), "-b", backend,
                                      "-o", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("peak RSS ") and last.split()[-1] == "GiB" and float(last.split()[2]) > 0


def test_export_prints_its_peak_and_a_classifier_loads_low_memory(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["export", "timm:test_vit", "--random-weights", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("peak RSS ") and last.split()[-1] == "GiB" and float(last.split()[2]) > 0
    for backend in installed_backends():  # one engine, always open: the lean settings, the same logits
        normal = enginekit.load(tmp_path / "o", backend=backend)
        low = enginekit.load(tmp_path / "o", backend=backend, low_memory=True)
        h, w = normal.preprocessing.size
        pixels = np.random.default_rng(0).standard_normal((2, 3, h, w)).astype(np.float32)
        want, got = normal.run_pixels(pixels), low.run_pixels(pixels)
        assert set(want) == set(got) and all(np.array_equal(want[k], got[k]) for k in want)


def test_a_watcher_sees_only_what_is_open(tiny_pipelines: dict) -> None:
    """``open_runners()`` lists the engines open now without opening any: during a low-memory
    step that is the denoiser alone (what a server interrupting a run should ask for)."""
    _, low = _pair(tiny_pipelines, "tiny-sd15", "onnxruntime")
    seen: list[list[str]] = []
    low(**dict(ARGS, callback=lambda i, t, x: seen.append([r.component for r in low.components.open_runners()])))
    assert seen == [["unet"], ["unet"]]
    assert low.components.open_runners() == [] and low.components.loaded == ()
