"""`enginekit generate`, `export` and `compile` on pipelines through click's CliRunner:
images written whole or not at all, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("diffusers")

from enginekit.app.cli import cli  # noqa: E402

from ..conftest import make_photo  # noqa: E402


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_generate_writes_the_images(tiny_pipelines: dict, tmp_path: Path) -> None:
    art = str(tiny_pipelines[("tiny-sd15", "onnx")])
    code, out = _run("generate", art, "a lighthouse at dusk", "-o", str(tmp_path / "l.png"), "--steps", "2",
                     "--seed", "42", "--negative", "blurry", "--height", "64", "--width", "80",
                     "--scheduler", "dpm++2m-karras", "--num-images", "2", "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["seed"] == 42 and report["steps"] == 2
    assert [Path(p).name for p in report["images"]] == ["l-1.png", "l-2.png"]
    assert Image.open(tmp_path / "l-1.png").size == (80, 64)
    assert not list(tmp_path.glob(".*"))  # no temporary left behind


def test_generate_with_a_step_cache_says_so(tiny_pipelines: dict, tmp_path: Path) -> None:
    art = str(tiny_pipelines[("tiny-sd15", "onnx")])
    code, out = _run("generate", art, "a lighthouse", "-o", str(tmp_path / "c.png"), "--steps", "4", "--seed", "1",
                     "--height", "64", "--width", "64", "--cache", "deepcache:2", "--json")
    assert code == 0, out
    assert json.loads(out)["cache"] == "deepcache:2"
    code, out = _run("generate", art, "a lighthouse", "-o", str(tmp_path / "p.png"), "--steps", "4", "--seed", "1",
                     "--height", "64", "--width", "64")
    assert code == 0 and "cache" not in out
    assert Image.open(tmp_path / "c.png").tobytes() != Image.open(tmp_path / "p.png").tobytes()


def test_generate_image_to_image(tiny_pipelines: dict, tmp_path: Path) -> None:
    make_photo((64, 64), seed=4).save(tmp_path / "init.png")
    code, out = _run("generate", str(tiny_pipelines[("tiny-sd15", "onnx")]), "a cat", "-o", str(tmp_path / "c.png"),
                     "--init-image", str(tmp_path / "init.png"), "--strength", "0.6", "--steps", "5")
    assert code == 0, out
    assert Image.open(tmp_path / "c.png").size == (64, 64)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--height", "500"], "height must be a multiple of 8, got 500"),
        (["--steps", "0"], "num_inference_steps must be between 1 and 1000, got 0"),
        (["--scheduler", "pndm"], "Invalid value for '--scheduler'"),
        (["--init-image", "{tmp}/not-an-image.png"], "not-an-image.png"),
        (["--strength", "0"], "strength must be above 0"),
        (["--cache", "deepcache:0"], "the interval must be between 1 and 100"),
    ],
)
def test_generate_bad_input_is_one_line_and_writes_nothing(tiny_pipelines: dict, tmp_path: Path,
                                                           extra: list[str], message: str) -> None:
    (tmp_path / "not-an-image.png").write_text("hello")
    if "--strength" in extra:
        make_photo((64, 64), seed=1).save(tmp_path / "ok.png")
        extra = [*extra, "--init-image", str(tmp_path / "ok.png")]
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    code, out = _run("generate", str(tiny_pipelines[("tiny-sd15", "onnx")]), "a cat", "-o",
                     str(tmp_path / "x.png"), *extra)
    assert code != 0
    assert message in out and "Traceback" not in out
    assert not (tmp_path / "x.png").exists()


def test_generate_on_a_classifier_is_refused(compiled: dict, tmp_path: Path) -> None:
    code, out = _run("generate", str(compiled[("timm", "onnx")]), "a cat", "-o", str(tmp_path / "x.png"))
    assert code == 1 and "generate needs a text-to-image pipeline" in out


def test_generate_output_must_be_an_image_name(tiny_pipelines: dict, tmp_path: Path) -> None:
    code, out = _run("generate", str(tiny_pipelines[("tiny-sd15", "onnx")]), "a cat", "-o", str(tmp_path / "x"))
    assert code == 1 and "must end in .png" in out


def test_compile_pipeline_fp16_and_static_and_inspect(tiny_pipelines: dict, tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    art = str(tiny_pipelines[("tiny-sdxl", "onnx")])
    code, out = _run("compile", art, "--backend", "openvino", "-o", str(tmp_path / "ov"), "--precision", "fp16",
                     "--height", "64", "--width", "64", "--json")
    assert code == 0, out
    manifest = json.loads(out)
    assert manifest["components"]["unet"]["inputs"][0]["shape"] == [2, 4, 8, 8]
    assert manifest["components"]["unet"]["precision"] == "fp16"
    code, out = _run("inspect", str(tmp_path / "ov"))
    assert code == 0, out
    for word in ("text_encoder_2", "vae_encoder", "tokenizer_2/tokenizer.json", "scheduler_config.json", "assets"):
        assert word in out
    code, out = _run("compile", art, "--backend", "onnxruntime", "-o", str(tmp_path / "ort"), "--precision", "fp16")
    assert code == 1 and "enginekit quantize ART --method fp16" in out
    code, out = _run("compile", art, "--backend", "openvino", "-o", str(tmp_path / "bad"), "--option", "streams=2")
    assert code == 1 and "unknown option 'streams'" in out
    assert not (tmp_path / "bad").exists()


def test_export_refuses_what_it_cannot_export(tmp_path: Path) -> None:
    code, out = _run("export", "sd15", "-o", str(tmp_path / "x"))
    assert code == 1 and "--random-weights" in out
    code, out = _run("export", "timm:vit_tiny_patch16_224", "--family", "sd15", "-o", str(tmp_path / "y"))
    assert code == 1 and "Traceback" not in out


def test_classifier_commands_refuse_a_pipeline_in_one_line(tiny_pipelines: dict, tmp_path: Path) -> None:
    art = str(tiny_pipelines[("tiny-sd15", "onnx")])
    make_photo((32, 32), seed=1).save(tmp_path / "p.png")
    for args, message in (
        (["predict", art, str(tmp_path / "p.png")], "predict classifies images"),
        (["quantize", art, "-m", "int8-dynamic", "-o", str(tmp_path / "q")], "cannot do 'int8-dynamic' for text-to-image; it offers: fp16, int8, int4"),
        (["evaluate", art, "--data", "builtin"], "evaluate does not apply to text-to-image artifacts"),
    ):
        code, out = _run(*args)
        assert code == 1 and message in out and "Traceback" not in out, (args, out)


def test_generate_refuses_a_wrong_digest(tiny_pipelines: dict, tmp_path: Path) -> None:
    code, out = _run("generate", str(tiny_pipelines[("tiny-sd15", "onnx")]), "a cat", "-o", str(tmp_path / "x.png"),
                     "--digest", "0" * 64, "--steps", "1")
    assert code == 1 and "digest" in out and "Traceback" not in out
    assert not (tmp_path / "x.png").exists()


def test_strength_without_an_init_image_is_an_error(tiny_pipelines: dict, tmp_path: Path) -> None:
    import enginekit
    from enginekit.errors import InputError

    art = tiny_pipelines[("tiny-sd15", "onnx")]
    code, out = _run("generate", str(art), "a cat", "-o", str(tmp_path / "c.png"), "--strength", "0.5")
    assert code == 2 and "--strength is for image-to-image" in out
    assert not (tmp_path / "c.png").exists()
    with enginekit.load(art, device="cpu") as pipe, pytest.raises(InputError, match="strength 0.5 is for image-to-image"):
        pipe("a cat", num_inference_steps=1, strength=0.5)
