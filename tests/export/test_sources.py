"""Model sources: timm and transformers folders, the hub cache, and refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from enginekit.errors import SourceError
from enginekit.export.sources import resolve_source

from ..conftest import TIMM_LABELS


def test_timm_folder(tiny_timm_dir: Path) -> None:
    src = resolve_source(str(tiny_timm_dir))
    assert src.library == "timm" and src.architecture == "vit_tiny_patch16_224"
    assert src.labels == tuple(TIMM_LABELS)
    assert src.preprocessing.size == (32, 32)
    assert src.preprocessing.interpolation == "bicubic"
    assert len(src.provenance["weights_sha256"]) == 64


def test_transformers_folder(tiny_hf_dir: Path) -> None:
    src = resolve_source(str(tiny_hf_dir))
    assert src.library == "transformers"
    assert src.labels == ("negative", "neutral", "positive")
    assert src.preprocessing.size == (32, 32)


def test_default_source() -> None:
    src = resolve_source("default")
    assert src.library == "timm" and src.labels == tuple(str(i) for i in range(10))
    assert src.provenance["source"] == "default"


def _fake_hub_cache(cache: Path, repo: str, folder: Path, revision: str = "a" * 40) -> None:
    """Lay ``folder`` out as huggingface_hub's cache holds a downloaded snapshot."""
    org, name = repo.split("/")
    base = cache / f"models--{org}--{name}"
    shutil.copytree(folder, base / "snapshots" / revision)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(revision)


def test_hub_id_through_the_offline_cache(tiny_hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    _fake_hub_cache(tmp_path, "acme/tiny-vit", tiny_hf_dir)
    for spec in ("acme/tiny-vit", "hf-hub:acme/tiny-vit"):
        src = resolve_source(spec)
        assert src.provenance["hub_id"] == "acme/tiny-vit"
        assert src.provenance["revision"] == "a" * 40
        assert src.labels == ("negative", "neutral", "positive")


def test_hub_id_missing_offline_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE is set"):
        resolve_source("acme/not-cached")


def test_pickled_weights_are_refused(tiny_timm_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_timm_dir, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(SourceError, match="never unpickles"):
        resolve_source(str(folder))


def test_folder_without_config_or_weights(tmp_path: Path, tiny_timm_dir: Path) -> None:
    with pytest.raises(SourceError, match="no config.json"):
        resolve_source(str(tmp_path))
    folder = tmp_path / "noweights"
    folder.mkdir()
    shutil.copy(tiny_timm_dir / "config.json", folder)
    with pytest.raises(SourceError, match="no model.safetensors"):
        resolve_source(str(folder))


def test_transformers_folder_needs_its_processor(tiny_hf_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "noproc"
    shutil.copytree(tiny_hf_dir, folder)
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(SourceError, match="no preprocessor_config.json"):
        resolve_source(str(folder))


def test_timm_name_with_safetensors_weights(tmp_path: Path) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(3)
    model = timm.create_model("test_vit", pretrained=False)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    src = resolve_source("timm:test_vit", weights=tmp_path / "w.safetensors")
    assert torch.equal(src.model.state_dict()["head.weight"], model.state_dict()["head.weight"])
    with pytest.raises(SourceError, match="never unpickled"):
        resolve_source("timm:test_vit", weights=tmp_path / "w.pt")


def test_weights_that_do_not_fit(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model("test_vit2", pretrained=False).state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(SourceError, match="do not fit the architecture"):
        resolve_source("timm:test_vit", weights=tmp_path / "w.safetensors")


def test_random_weights_are_seeded() -> None:
    import torch

    a = resolve_source("timm:test_vit", random_weights=True, seed=5).model.state_dict()
    b = resolve_source("timm:test_vit", random_weights=True, seed=5).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_source_rebuilt_from_a_manifest(tiny_timm_dir: Path, tmp_path: Path) -> None:
    """What `bench --baseline torch` relies on: the provenance an export records rebuilds the same model."""
    import torch

    from enginekit.export.sources import source_for_manifest

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    original = resolve_source(str(tiny_timm_dir))
    rebuilt = source_for_manifest(dict(original.provenance))
    with torch.inference_mode():
        assert torch.equal(original.model(x), rebuilt.model(x))
    seeded = resolve_source("timm:vit_tiny_patch16_224", random_weights=True, seed=3)
    again = source_for_manifest(dict(seeded.provenance))
    assert all(torch.equal(a, b) for a, b in zip(seeded.model.state_dict().values(), again.model.state_dict().values()))
    # weights that changed since the export are refused, not silently used as the baseline
    copy = tmp_path / "copy"
    shutil.copytree(tiny_timm_dir, copy)
    recorded = dict(resolve_source(str(copy)).provenance)
    state = {k: v + 1.0 for k, v in original.model.state_dict().items()}
    from safetensors.torch import save_file

    save_file(state, str(copy / "model.safetensors"))
    with pytest.raises(SourceError, match="weights changed"):
        source_for_manifest(recorded)
    with pytest.raises(SourceError, match="no source model"):
        source_for_manifest({})
