"""The runtime path works where torch, torchvision, timm and transformers cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ..conftest import backend_params, installed_backends, make_photo

# Installed before anything else in the child: importing a blocked package fails
# as it would on an edge box that never installed it.
_BLOCKER = textwrap.dedent(
    """
    import sys
    BLOCKED = {"torch", "torchvision", "timm", "transformers", "diffusers"}

    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by test)", name=name)
            return None

    sys.meta_path.insert(0, _Block())
    """
)


@pytest.mark.parametrize("kind", backend_params("onnx"))
def test_load_and_predict_without_torch(compiled: dict, tmp_path: Path, kind: str) -> None:
    image = tmp_path / "photo.png"
    make_photo((48, 40), seed=7).save(image)
    code = _BLOCKER + textwrap.dedent(
        f"""
        import json
        import enginekit
        clf = enginekit.load({str(compiled[("timm", kind)])!r}, device="cpu")
        preds = clf.predict([{str(image)!r}], top_k=2)
        feats = clf.embed([{str(image)!r}])
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps({{"label": preds[0].label, "dim": feats.shape[1], "heavy": heavy}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == [] and out["dim"] == 32 and out["label"]


def test_cli_predict_without_torch(compiled: dict, tmp_path: Path) -> None:
    image = tmp_path / "photo.png"
    make_photo((48, 40), seed=8).save(image)
    code = _BLOCKER + textwrap.dedent(
        f"""
        from enginekit.app.cli import main
        sys.argv = ["enginekit", "predict", {str(compiled[("timm", "onnx")])!r}, {str(image)!r}, "--json"]
        main()
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["image"] == str(image)


def test_export_without_torch_names_the_extra(tmp_path: Path) -> None:
    code = _BLOCKER + textwrap.dedent(
        f"""
        from enginekit.app.cli import main
        sys.argv = ["enginekit", "export", "default", "-o", {str(tmp_path / "o")!r}]
        main()
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "pip install 'enginekit[export]'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sd3", "tiny-flux"])
def test_generate_without_torch(tiny_pipelines: dict, tmp_path: Path, name: str) -> None:
    """TextToImage and `enginekit generate` with torch, diffusers and transformers unimportable."""
    from tests.serve.test_lora_serve import write_unet_lora

    out = tmp_path / "a.png"
    lora = write_unet_lora(tiny_pipelines[(name, "onnx")], tmp_path / "ink.safetensors")
    code = _BLOCKER + textwrap.dedent(
        f"""
        import json
        import enginekit
        from enginekit.app.cli import main
        pipe = enginekit.load({str(tiny_pipelines[(name, "onnx")])!r}, device="cpu")
        images = pipe("a lighthouse", num_inference_steps=2, seed=3, output_type="np").images
        pipe("a lighthouse", num_inference_steps=2, seed=3, loras={{{str(lora)!r}: 0.8}})  # LoRA at run time too
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps({{"shape": list(images.shape), "heavy": heavy}}))
        sys.argv = ["enginekit", "generate", {str(tiny_pipelines[(name, "onnx")])!r}, "a lighthouse",
                    "-o", {str(out)!r}, "--steps", "2", "--seed", "3", "--json"]
        main()
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    first = json.loads(proc.stdout.strip().splitlines()[0])
    assert first["heavy"] == [] and first["shape"][0] == 1 and first["shape"][-1] == 3
    assert out.is_file()
