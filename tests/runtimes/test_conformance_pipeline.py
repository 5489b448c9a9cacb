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

from ..conftest import backend_params, diffusers_twin, installed_backends  # noqa: E402

COMPONENTS = {"tiny-sd15": ("text_encoder", "unet", "vae_decoder", "vae_encoder"),
              "tiny-sdxl": ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"),
              "tiny-sd3": ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder",
                           "vae_encoder"),
              "tiny-flux": ("text_encoder", "text_encoder_2", "transformer", "vae_decoder", "vae_encoder")}
_twins: dict[str, object] = {}


def _pipe(name: str):
    if name not in _twins:
        _twins[name] = diffusers_twin(name)
    return _twins[name]


def _reference(pipe, component: str, rng: np.random.Generator) -> tuple[dict, dict]:
    """(feeds, PyTorch outputs) for one component."""
    with torch.inference_mode():
        if component == "text_encoder_3" or (component == "text_encoder_2" and type(pipe).__name__ == "FluxPipeline"):
            enc = getattr(pipe, component)  # T5: any length, </s> then <pad>
            ids = rng.integers(3, enc.config.vocab_size, (3, 40)).astype(np.int64)
            ids[:, 30], ids[:, 31:] = 1, 0
            return {"input_ids": ids}, {"last_hidden_state": enc(torch.from_numpy(ids))[0]}
        if component == "transformer" and type(pipe).__name__ == "FluxPipeline":
            cfg = pipe.transformer.config
            h, w = 3, 4  # packed-token grid
            img_ids = np.zeros((h, w, 3), np.float32)
            img_ids[..., 1] += np.arange(h)[:, None]
            img_ids[..., 2] += np.arange(w)[None, :]
            feeds = {"sample": rng.standard_normal((3, h * w, cfg.in_channels), dtype=np.float32),
                     "timestep": np.array([0.01, 0.5, 0.98], np.float32),
                     "encoder_hidden_states": rng.standard_normal((3, 40, cfg.joint_attention_dim), dtype=np.float32),
                     "pooled_projections": rng.standard_normal((3, cfg.pooled_projection_dim), dtype=np.float32),
                     "txt_ids": np.zeros((40, 3), np.float32), "img_ids": img_ids.reshape(h * w, 3),
                     "guidance": np.array([1.0, 3.5, 7.0], np.float32)}
            out = pipe.transformer(hidden_states=torch.from_numpy(feeds["sample"]),
                                   timestep=torch.from_numpy(feeds["timestep"]),
                                   encoder_hidden_states=torch.from_numpy(feeds["encoder_hidden_states"]),
                                   pooled_projections=torch.from_numpy(feeds["pooled_projections"]),
                                   txt_ids=torch.from_numpy(feeds["txt_ids"]), img_ids=torch.from_numpy(feeds["img_ids"]),
                                   guidance=torch.from_numpy(feeds["guidance"])).sample
            return feeds, {"out_sample": out}
        if component == "transformer":
            cfg = pipe.transformer.config
            sample = rng.standard_normal((3, cfg.in_channels, 6, 10), dtype=np.float32)
            t = np.array([1.5, 500.0, 981.25], dtype=np.float32)
            ehs = rng.standard_normal((3, 77 + 40, cfg.joint_attention_dim), dtype=np.float32)
            pooled = rng.standard_normal((3, cfg.pooled_projection_dim), dtype=np.float32)
            out = pipe.transformer(hidden_states=torch.from_numpy(sample), timestep=torch.from_numpy(t),
                                   encoder_hidden_states=torch.from_numpy(ehs),
                                   pooled_projections=torch.from_numpy(pooled)).sample
            return ({"sample": sample, "timestep": t, "encoder_hidden_states": ehs, "pooled_projections": pooled},
                    {"out_sample": out})
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


@pytest.mark.parametrize("kind", backend_params("onnx"))
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
