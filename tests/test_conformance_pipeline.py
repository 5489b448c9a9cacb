"""Every backend x every component of the tiny pipelines against PyTorch (diffusers'
modules themselves, not the export's wrappers), on seeded inputs of a size and batch
other than the traced ones."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from enginekit.api import load_runner  # noqa: E402
from enginekit.fidelity import compare_outputs  # noqa: E402

from .conftest import diffusers_twin, installed_backends  # noqa: E402

COMPONENTS = {"tiny-sd15": ("text_encoder", "unet", "vae_decoder", "vae_encoder"),
              "tiny-sdxl": ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")}
_twins: dict[str, object] = {}


def _pipe(name: str):
    if name not in _twins:
        _twins[name] = diffusers_twin(name)
    return _twins[name]


def _reference(pipe, component: str, rng: np.random.Generator) -> tuple[dict, dict]:
    """(feeds, PyTorch outputs) for one component."""
    with torch.inference_mode():
        if component.startswith("text_encoder"):
            enc = getattr(pipe, component)
            ids = rng.integers(0, enc.config.vocab_size, (3, 77)).astype(np.int64)
            ids[:, 0], ids[:, -1] = 49406, 49407
            out = enc(torch.from_numpy(ids), output_hidden_states=True)
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
            return {"input_ids": ids}, {"last_hidden_state": out.last_hidden_state, "pooled": pooled,
                                        "penultimate_hidden_state": out.hidden_states[-2]}
        if component == "unet":
            cfg = pipe.unet.config
            sample = rng.standard_normal((3, cfg.in_channels, 6, 10), dtype=np.float32)
            t = np.array([1.5, 500.0, 981.25], dtype=np.float32)
            ehs = rng.standard_normal((3, 77, cfg.cross_attention_dim), dtype=np.float32)
            feeds = {"sample": sample, "timestep": t, "encoder_hidden_states": ehs}
            added = None
            if cfg.addition_embed_type == "text_time":
                dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
                feeds["text_embeds"] = rng.standard_normal((3, dim), dtype=np.float32)
                feeds["time_ids"] = np.tile(np.array([[48, 80, 0, 0, 48, 80]], np.float32), (3, 1))
                added = {"text_embeds": torch.from_numpy(feeds["text_embeds"]),
                         "time_ids": torch.from_numpy(feeds["time_ids"])}
            out = pipe.unet(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(ehs),
                            added_cond_kwargs=added).sample
            return feeds, {"out_sample": out}
        if component == "vae_decoder":
            z = rng.standard_normal((2, pipe.vae.config.latent_channels, 6, 10), dtype=np.float32)
            return {"latent_sample": z}, {"sample": pipe.vae.decode(torch.from_numpy(z)).sample}
        x = rng.uniform(-1, 1, (2, 3, 48, 80)).astype(np.float32)
        return {"sample": x}, {"latent_parameters": pipe.vae.encode(torch.from_numpy(x)).latent_dist.parameters}


@pytest.mark.parametrize("kind", ["onnx", *installed_backends()])
@pytest.mark.parametrize(("name", "component"), [(n, c) for n, cs in COMPONENTS.items() for c in cs])
def test_component_matches_pytorch(tiny_pipelines: dict, name: str, component: str, kind: str) -> None:
    feeds, ref = _reference(_pipe(name), component, np.random.default_rng(7))
    runner, _ = load_runner(tiny_pipelines[(name, kind)], device="cpu", component=component)
    got = runner.run(feeds)
    runner.close()
    for key, value in ref.items():
        value = value.numpy()
        report = compare_outputs({key: value}, {key: got[key]})
        scale = float(np.abs(value).max())
        assert report[f"{key}_cosine"] >= 0.9999, (key, report)
        assert report[f"{key}_max_abs"] <= 1e-4 + 1e-3 * scale, (key, report)
