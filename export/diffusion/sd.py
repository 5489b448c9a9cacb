"""Export a diffusion pipeline (SD 1.5, SD 2.x, SDXL, SD3) to an ONNX artifact, one component at a time.

Folders and IO contract (symbolic dims are strings; the numpy runtime depends on these names):

- ``text_encoder/model.onnx`` (SDXL also ``text_encoder_2/``): ``input_ids`` int64 (batch, sequence)
  -> ``last_hidden_state`` (batch, sequence, H), ``penultimate_hidden_state`` (hidden_states[-2]),
  ``pooled`` (batch, P): pooler_output, or text_embeds for CLIPTextModelWithProjection.
  A T5 encoder (SD3's ``text_encoder_3``) gives ``last_hidden_state`` only, over a free sequence.
- ``unet/model.onnx``: ``sample`` (batch, C, latent_height, latent_width), ``timestep`` float32 (batch,),
  ``encoder_hidden_states`` (batch, sequence, D); SDXL adds ``text_embeds`` and ``time_ids`` (batch, 6);
  an LCM UNet (``time_cond_proj_dim``) adds ``timestep_cond``. Out ``out_sample``.
- ``transformer/model.onnx`` (SD3's MMDiT): the same ``sample``, ``timestep`` (sigma x 1000) and
  ``encoder_hidden_states`` (CLIP tokens then T5 tokens) plus ``pooled_projections`` (batch, P) ->
  ``out_sample`` (the flow velocity).
- ``vae_decoder/model.onnx``: ``latent_sample`` (already divided by the scaling factor) -> ``sample``.
- ``vae_encoder/model.onnx``: ``sample`` -> ``latent_parameters`` (mean and logvar concatenated).

Each component is checked against PyTorch with ONNX Runtime on seeded inputs of another batch and
size than the traced ones; a miss raises :class:`FidelityError` and nothing is written.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import threading
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from enginekit.artifact import atomic_artifact, make_assets, make_component, write_manifest
from enginekit.errors import ExportError, FidelityError, SourceError, one_line
from enginekit.export.diffusion.families import check_family, get_family
from enginekit.export.diffusion.lora import LoraSpec, fuse_loras
from enginekit.export.diffusion.sources import PipelineSource, resolve_pipeline
from enginekit.export.diffusion.unet_sizes import carry_skip_sizes
from enginekit.fidelity import compare_outputs
from enginekit.export.provenance import check_export_request, host, tool_versions
from enginekit.manifest import Component, Manifest, TensorSpec
from enginekit.runtimes.onnxruntime import run_onnx_file

__all__ = ["PipelineExportOptions", "export_pipeline"]

#: Past this many bytes of weights, protobuf's 2 GB limit needs external data.
_EXTERNAL_DATA_BYTES = 1_800_000_000
_DATA_FILE = "model.onnx.data"
_TEXT_OUTPUTS = ("last_hidden_state", "penultimate_hidden_state", "pooled")
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
#: T5 prompt lengths traced and checked (two, so the sequence axis is exercised).
_T5_TRACE, _T5_PARITY = 32, 48


@dataclass(frozen=True)
class PipelineExportOptions:
    opset: int = 18
    seed: int = 0
    #: Parity budget per output: max |onnx - torch| <= atol + rtol * max |torch|, and cosine >= min_cosine.
    atol: float = 1e-4
    rtol: float = 1e-3
    min_cosine: float = 0.9999
    #: Batch traced, and the other batch the parity check runs (exercising the dynamic axis).
    trace_batch: int = 2
    parity_batch: int = 3
    #: Prompt length traced and checked (CLIP's 77).
    sequence_length: int = 77
    #: The whole-image check: the exported pipeline against diffusers' on the same
    #: latents; under ``min_psnr`` dB the export fails. Off keeps memory lower (each
    #: component is released as soon as it is exported).
    image_check: bool = True
    image_check_steps: int = 3
    #: Image side for the check (None: the model's own size).
    image_check_size: int | None = None
    min_psnr: float = 40.0
    #: LoRA files fused into the weights (in order, each at its scale) before anything is exported.
    loras: tuple[LoraSpec, ...] = ()
    #: SD3/SD3.5: leave the T5 encoder out (never built or loaded), as diffusers allows.
    without_t5: bool = False

    def __post_init__(self) -> None:
        check_export_request(self.opset, self.atol, self.rtol)


# --------------------------------------------------------------------------- wrappers


def _wrappers() -> dict[str, type]:
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self, encoder: Any) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            out = self.encoder(input_ids, output_hidden_states=True, return_dict=True)
            pooled = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
            return out.last_hidden_state, out.hidden_states[-2], pooled

    class UNet(torch.nn.Module):
        def __init__(self, unet: Any, extra: tuple[str, ...]) -> None:
            super().__init__()
            self.unet = unet
            self.extra = extra

        def forward(self, sample, timestep, encoder_hidden_states, *rest):  # type: ignore[no-untyped-def]
            named = dict(zip(self.extra, rest))
            added = {"text_embeds": named["text_embeds"], "time_ids": named["time_ids"]} if "time_ids" in named else None
            return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=named.get("timestep_cond"),
                             added_cond_kwargs=added, return_dict=False)[0]

    class T5Encoder(torch.nn.Module):
        def __init__(self, encoder: Any) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.encoder(input_ids, return_dict=False)[0]

    def tensor_crop(self: Any, height: Any, width: Any) -> torch.Tensor:
        """diffusers' PatchEmbed.cropped_pos_embed, the centre offsets computed on tensors: as
        shape arithmetic, torch.export folds ``(max - h) // 2`` into a form that is one row off
        for an odd patch grid (the graph then fails or silently shifts the embedding)."""
        size = self.pos_embed_max_size
        grid = self.pos_embed.reshape(1, size, size, -1)
        for axis, side in ((1, height // self.patch_size), (2, width // self.patch_size)):
            start = torch.div(torch.full((), size, dtype=torch.int64) - torch.full((), side, dtype=torch.int64),
                              2, rounding_mode="floor")
            grid = grid.index_select(axis, torch.arange(side, dtype=torch.int64) + start)
        return grid.reshape(1, -1, grid.shape[-1])

    class Transformer(torch.nn.Module):
        def __init__(self, transformer: Any) -> None:
            super().__init__()
            self.transformer = transformer
            embed = getattr(transformer, "pos_embed", None)
            if getattr(embed, "pos_embed_max_size", None):  # same numbers, an exportable crop
                embed.cropped_pos_embed = types.MethodType(tensor_crop, embed)

        def forward(self, sample, timestep, encoder_hidden_states, pooled_projections):  # type: ignore[no-untyped-def]
            return self.transformer(hidden_states=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                                    pooled_projections=pooled_projections, return_dict=False)[0]

    class VaeDecoder(torch.nn.Module):
        def __init__(self, vae: Any) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
            return self.vae.decode(latent_sample, return_dict=False)[0]

    class VaeEncoder(torch.nn.Module):
        def __init__(self, vae: Any) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, sample: torch.Tensor) -> torch.Tensor:
            return self.vae.encode(sample).latent_dist.parameters

    class FluxTransformer(torch.nn.Module):
        def __init__(self, transformer: Any) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, sample, timestep, encoder_hidden_states, pooled_projections, txt_ids, img_ids,
                    guidance=None):  # type: ignore[no-untyped-def]
            return self.transformer(hidden_states=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                                    pooled_projections=pooled_projections, txt_ids=txt_ids, img_ids=img_ids,
                                    guidance=guidance, return_dict=False)[0]

    return {"text": TextEncoder, "t5": T5Encoder, "unet": UNet, "transformer": Transformer, "flux": FluxTransformer,
            "vae_decoder": VaeDecoder, "vae_encoder": VaeEncoder}


@dataclass
class _Plan:
    """One component to export: its module, IO specs, traced and parity inputs."""

    name: str
    module: Any
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    example: tuple[Any, ...]
    parity: tuple[Any, ...]
    n_bytes: int


def _token_ids(gen: Any, batch: int, length: int, vocab: int, bos: int, eos: int) -> Any:
    """Prompt-like ids: BOS, random tokens, EOS at a random place, then EOS padding."""
    import torch

    ids = torch.randint(0, min(vocab, 49406), (batch, length), generator=gen)
    ids[:, 0] = bos
    ends = torch.randint(2, length, (batch,), generator=gen)
    for row, end in enumerate(ends.tolist()):
        ids[row, end:] = eos
    return ids


def _plans(pipe: Any, family: str, opts: PipelineExportOptions) -> list[Callable[[], _Plan]]:
    """A factory per component, so each module is wrapped only when its turn comes: the text
    encoders, then the family's denoiser plan (with the VAE)."""
    import torch

    W = _wrappers()
    gen = torch.Generator().manual_seed(opts.seed)
    B, PB, L = opts.trace_batch, opts.parity_batch, opts.sequence_length
    names = [n for n in _TEXT_ENCODERS if getattr(pipe, n, None) is not None]

    def nbytes(m: Any) -> int:
        return sum(p.numel() * p.element_size() for p in m.parameters())

    def text(name: str) -> Callable[[], _Plan]:
        def make() -> _Plan:
            enc = getattr(pipe, name)
            cfg = enc.config
            if _is_t5(enc):
                return t5(name, enc)
            tok = getattr(pipe, "tokenizer" + name[len("text_encoder"):])
            bos, eos = int(tok.bos_token_id), int(tok.eos_token_id)
            pooled_dim = int(getattr(cfg, "projection_dim", cfg.hidden_size)) if hasattr(enc, "text_projection") else int(cfg.hidden_size)
            h = int(cfg.hidden_size)
            seq = ("batch", "sequence")
            return _Plan(
                name, W["text"](enc).eval(),
                [TensorSpec("input_ids", "int64", seq)],
                [TensorSpec("last_hidden_state", "float32", (*seq, h)),
                 TensorSpec("penultimate_hidden_state", "float32", (*seq, h)),
                 TensorSpec("pooled", "float32", ("batch", pooled_dim))],
                (_token_ids(gen, B, L, cfg.vocab_size, bos, eos),),
                (_token_ids(gen, PB, L, cfg.vocab_size, bos, eos),),
                nbytes(enc),
            )
        return make

    def t5(name: str, enc: Any) -> _Plan:
        cfg = enc.config
        seq = ("batch", "sequence")
        # Traced and checked at two lengths: T5's relative positions take any.
        return _Plan(
            name, W["t5"](enc).eval(),
            [TensorSpec("input_ids", "int64", seq)],
            [TensorSpec("last_hidden_state", "float32", (*seq, int(cfg.d_model)))],
            (_t5_ids(gen, B, _T5_TRACE, cfg.vocab_size),),
            (_t5_ids(gen, PB, _T5_PARITY, cfg.vocab_size),),
            nbytes(enc),
        )

    transformer_plan = _TRANSFORMER_PLANS.get(get_family(family).plan)
    if transformer_plan is not None:
        return [text(n) for n in names] + transformer_plan(pipe, W, gen, opts, nbytes)
    unet_cfg = pipe.unet.config
    f = 2 ** (len(unet_cfg.block_out_channels) - 1)
    vae_f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    # Traced at one aspect, checked at the transposed one: both axes move.
    trace_hw, parity_hw = (2 * f, 3 * f), (3 * f, 2 * f)
    C = int(unet_cfg.in_channels)
    lat = ("batch", C, "latent_height", "latent_width")

    def unet() -> _Plan:
        u = pipe.unet
        # Every latent size diffusers' UNet takes, odd sides included; checked at odd sides.
        check_hw = (parity_hw[0] + 1, parity_hw[1] - 1) if carry_skip_sizes(u) else parity_hw
        D = int(unet_cfg.cross_attention_dim)
        extra: list[tuple[str, tuple[Any, ...]]] = []
        if unet_cfg.addition_embed_type == "text_time":
            text_dim = int(unet_cfg.projection_class_embeddings_input_dim) - 6 * int(unet_cfg.addition_time_embed_dim)
            extra += [("text_embeds", ("batch", text_dim)), ("time_ids", ("batch", 6))]
        elif unet_cfg.addition_embed_type is not None:
            raise ExportError(f"UNet addition_embed_type {unet_cfg.addition_embed_type!r} is not supported")
        if unet_cfg.time_cond_proj_dim is not None:
            extra.append(("timestep_cond", ("batch", int(unet_cfg.time_cond_proj_dim))))

        def feeds(batch: int, hw: tuple[int, int]) -> tuple[Any, ...]:
            h, w = hw
            out = [torch.randn(batch, C, h, w, generator=gen),
                   torch.rand(batch, generator=gen) * 999.0,  # fractional, as Karras sigmas give
                   torch.randn(batch, L, D, generator=gen)]
            for name, shape in extra:
                if name == "time_ids":
                    size = float(h * vae_f)
                    out.append(torch.tensor([[size, size, 0.0, 0.0, size, size]]).repeat(batch, 1))
                else:
                    out.append(torch.randn(batch, shape[1], generator=gen))
            return tuple(out)

        inputs = [TensorSpec("sample", "float32", lat), TensorSpec("timestep", "float32", ("batch",)),
                  TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", D))]
        inputs += [TensorSpec(n, "float32", s) for n, s in extra]
        out_c = int(unet_cfg.out_channels)
        return _Plan("unet", W["unet"](u, tuple(n for n, _ in extra)).eval(), inputs,
                     [TensorSpec("out_sample", "float32", ("batch", out_c, "latent_height", "latent_width"))],
                     feeds(B, trace_hw), feeds(PB, check_hw), nbytes(u))

    return [text(n) for n in names] + [unet, *_vae_plans(pipe, W, gen, opts, nbytes, trace_hw, parity_hw)]


def _vae_plans(pipe: Any, W: dict[str, type], gen: Any, opts: PipelineExportOptions, nbytes: Callable[[Any], int],
               trace_hw: tuple[int, int], parity_hw: tuple[int, int]) -> list[Callable[[], _Plan]]:
    import torch

    B = opts.trace_batch
    vae_f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    lc = int(pipe.vae.config.latent_channels)

    def vae_decoder() -> _Plan:
        v = pipe.vae
        return _Plan("vae_decoder", W["vae_decoder"](v).eval(),
                     [TensorSpec("latent_sample", "float32", ("batch", lc, "latent_height", "latent_width"))],
                     [TensorSpec("sample", "float32", ("batch", 3, "height", "width"))],
                     (torch.randn(B, lc, *trace_hw, generator=gen),),
                     (torch.randn(1, lc, *parity_hw, generator=gen),), nbytes(v))

    def vae_encoder() -> _Plan:
        v = pipe.vae
        th, tw = (d * vae_f for d in trace_hw)
        ph, pw = (d * vae_f for d in parity_hw)
        return _Plan("vae_encoder", W["vae_encoder"](v).eval(),
                     [TensorSpec("sample", "float32", ("batch", 3, "height", "width"))],
                     [TensorSpec("latent_parameters", "float32", ("batch", 2 * lc, "latent_height", "latent_width"))],
                     (torch.rand(B, 3, th, tw, generator=gen) * 2 - 1,),
                     (torch.rand(1, 3, ph, pw, generator=gen) * 2 - 1,), nbytes(v))

    return [vae_decoder, vae_encoder]


def _transformer_and_vae(pipe: Any, W: dict[str, type], gen: Any, opts: PipelineExportOptions,
                         nbytes: Callable[[Any], int]) -> list[Callable[[], _Plan]]:
    """SD3's MMDiT denoiser, then the VAE: latents a multiple of the patch size, the
    prompt CLIP's tokens then T5's (of a free length)."""
    import torch

    cfg = pipe.transformer.config
    p = int(cfg.patch_size)
    # Checked at another area with odd patch-grid sides, which a baked position crop would miss.
    trace_hw, parity_hw = (4 * p, 6 * p), (5 * p, 3 * p)
    B, PB, L = opts.trace_batch, opts.parity_batch, opts.sequence_length
    C, D, P = int(cfg.in_channels), int(cfg.joint_attention_dim), int(cfg.pooled_projection_dim)

    def transformer() -> _Plan:
        def feeds(batch: int, hw: tuple[int, int], t5_len: int) -> tuple[Any, ...]:
            return (torch.randn(batch, C, *hw, generator=gen),
                    torch.rand(batch, generator=gen) * 1000.0,  # sigma x 1000
                    torch.randn(batch, L + t5_len, D, generator=gen),
                    torch.randn(batch, P, generator=gen))

        lat = ("batch", C, "latent_height", "latent_width")
        inputs = [TensorSpec("sample", "float32", lat), TensorSpec("timestep", "float32", ("batch",)),
                  TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", D)),
                  TensorSpec("pooled_projections", "float32", ("batch", P))]
        outputs = [TensorSpec("out_sample", "float32", ("batch", int(cfg.out_channels), "latent_height", "latent_width"))]
        return _Plan("transformer", W["transformer"](pipe.transformer).eval(), inputs, outputs,
                     feeds(B, trace_hw, _T5_TRACE), feeds(PB, parity_hw, _T5_PARITY), nbytes(pipe.transformer))

    return [transformer, *_vae_plans(pipe, W, gen, opts, nbytes, trace_hw, parity_hw)]


def _flux_and_vae(pipe: Any, W: dict[str, type], gen: Any, opts: PipelineExportOptions,
                  nbytes: Callable[[Any], int]) -> list[Callable[[], _Plan]]:
    """FLUX's transformer on packed latents (2x2 patches of the VAE latent as one token of
    4C channels), with the rotary ids of text and image tokens and, for dev, the guidance."""
    import torch

    cfg = pipe.transformer.config
    trace_grid, parity_grid = (2, 3), (3, 5)  # packed-token grids: other sizes and areas
    B, PB = opts.trace_batch, opts.parity_batch
    C, D, P = int(cfg.in_channels), int(cfg.joint_attention_dim), int(cfg.pooled_projection_dim)
    guided = bool(cfg.guidance_embeds)

    def transformer() -> _Plan:
        def feeds(batch: int, grid: tuple[int, int], t5_len: int) -> tuple[Any, ...]:
            h, w = grid
            img_ids = torch.zeros(h, w, 3)
            img_ids[..., 1] += torch.arange(h)[:, None]
            img_ids[..., 2] += torch.arange(w)[None, :]
            out = [torch.randn(batch, h * w, C, generator=gen),
                   torch.rand(batch, generator=gen),  # FLUX takes sigma (timestep / 1000)
                   torch.randn(batch, t5_len, D, generator=gen),
                   torch.randn(batch, P, generator=gen),
                   torch.zeros(t5_len, 3),
                   img_ids.reshape(h * w, 3)]
            if guided:
                out.append(torch.rand(batch, generator=gen) * 5.0)
            return tuple(out)

        inputs = [TensorSpec("sample", "float32", ("batch", "image_sequence", C)),
                  TensorSpec("timestep", "float32", ("batch",)),
                  TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", D)),
                  TensorSpec("pooled_projections", "float32", ("batch", P)),
                  TensorSpec("txt_ids", "float32", ("sequence", 3)),
                  TensorSpec("img_ids", "float32", ("image_sequence", 3))]
        if guided:
            inputs.append(TensorSpec("guidance", "float32", ("batch",)))
        out_c = int(cfg.out_channels or C)
        outputs = [TensorSpec("out_sample", "float32", ("batch", "image_sequence", out_c))]
        return _Plan("transformer", W["flux"](pipe.transformer).eval(), inputs, outputs,
                     feeds(B, trace_grid, _T5_TRACE), feeds(PB, parity_grid, _T5_PARITY), nbytes(pipe.transformer))

    trace_hw = tuple(2 * d for d in trace_grid)
    parity_hw = tuple(2 * d for d in parity_grid)
    return [transformer, *_vae_plans(pipe, W, gen, opts, nbytes, trace_hw, parity_hw)]  # type: ignore[arg-type]


#: The transformer families' denoiser plans, by the family's ``plan`` (the UNet's is inline above).
_TRANSFORMER_PLANS = {"mmdit": _transformer_and_vae, "flux": _flux_and_vae}


def _is_t5(encoder: Any) -> bool:
    return type(encoder).__name__.startswith("T5")


def _t5_ids(gen: Any, batch: int, length: int, vocab: int) -> Any:
    """T5-like ids: random tokens, ``</s>`` (1) at a random place, then ``<pad>`` (0)."""
    import torch

    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    ends = torch.randint(1, length, (batch,), generator=gen)
    for row, end in enumerate(ends.tolist()):
        ids[row, end] = 1
        ids[row, end + 1:] = 0
    return ids


# --------------------------------------------------------------------------- export


class _PeakRSS:
    """Sample this process's resident memory in a thread; ``peak`` is the highest seen."""

    def __init__(self, interval: float = 0.1) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def sample(self) -> int:
        self.peak = max(self.peak, self._proc.memory_info().rss)
        return self.peak

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def export_pipeline(
    spec_or_source: str | PipelineSource,
    out_dir: str | Path,
    options: PipelineExportOptions = PipelineExportOptions(),
    *,
    family: str | None = None,
    random_weights: bool = False,
    revision: str | None = None,
    overwrite: bool = False,
    on_step: Callable[[str], None] = lambda msg: None,
) -> Manifest:
    """Export a UNet pipeline (a source spec, see :func:`resolve_pipeline`, or a loaded
    :class:`PipelineSource`) to the ONNX artifact ``out_dir``.

    A spec resolved here is owned here: each component is dropped from the pipeline
    once exported, so a full-size SD 1.5 fits in 24 GB. A :class:`PipelineSource`
    passed in is left whole (its caller holds it), though ``options.loras`` are fused into it.
    """
    with _PeakRSS() as rss:
        started = time.monotonic()
        owned = not isinstance(spec_or_source, PipelineSource)
        if owned:
            on_step("loading the PyTorch pipeline")
            src = resolve_pipeline(str(spec_or_source), family=family, random_weights=random_weights,
                                   seed=options.seed, revision=revision, without_t5=options.without_t5)
        else:
            src = spec_or_source
            try:
                check_family("the source", src.family, family)
            except SourceError as exc:
                raise ExportError(str(exc)) from None
        pipe = src.pipeline
        if options.loras:
            on_step(f"fusing {len(options.loras)} LoRA file(s) into the weights")
            src.provenance["lora"] = fuse_loras(pipe, src.family, options.loras)
            rss.sample()
        task_config = get_family(src.family).task_config(pipe)
        # Read before any component is dropped: setting one to None rewrites the pipeline's config.
        model_index = _model_index(pipe)
        exporters: dict[str, str] = {}
        components: dict[str, Component] = {}
        fidelity: dict[str, Any] = {}
        with atomic_artifact(out_dir, overwrite=overwrite,
                             inputs=(spec_or_source,) if owned else ()) as tmp:
            plans = _plans(pipe, src.family, options)
            for i, make in enumerate(plans, 1):
                plan = make()
                on_step(f"[{i}/{len(plans)}] {plan.name}: exporting to ONNX (opset {options.opset})")
                droppable = owned and not options.image_check and plan.name in (*_TEXT_ENCODERS, "unet", "transformer")

                def release(plan: _Plan = plan) -> None:
                    # The last references: the weights go now, before ONNX Runtime loads the graph
                    # for the parity check, so a 10 GB transformer is never in memory twice.
                    plan.module = None
                    setattr(pipe, plan.name, None)
                    gc.collect()

                comp, report, exporter = _export_component(tmp, plan, options, on_step, i, len(plans),
                                                           release if droppable else None)
                components[plan.name] = comp
                fidelity[plan.name] = {k: report[k] for k in ("min_cosine", "max_abs", "passed")}
                exporters[plan.name] = exporter
                del plan, make, release
                gc.collect()
                rss.sample()
            on_step("writing tokenizers, scheduler and model index")
            assets = _write_assets(tmp, pipe, task_config, model_index)
            rss.sample()
            manifest = Manifest(
                kind="onnx",
                task="text-to-image",
                family=src.family,
                components=components,
                assets=make_assets(tmp, assets),
                task_config=task_config,
                provenance={**src.provenance, "family": src.family, "parent": None,
                            "tools": tool_versions(options.opset, ("diffusers", "transformers", "tokenizers"),
                                                   [tmp / c.entry for c in components.values()]), "host": host(),
                            "exporters": exporters, "peak_rss_bytes": rss.peak,
                            "export_seconds": round(time.monotonic() - started, 1)},
                target={"backend": "onnxruntime", "device": "cpu"},
                fidelity={"reference": "pytorch", "runtime": "onnxruntime-cpu", "components": fidelity},
            )
            write_manifest(tmp, manifest)
            if options.image_check:
                manifest = _check_image(pipe, tmp, manifest, options, on_step)
                rss.sample()
                manifest = manifest.replace(provenance={**manifest.provenance, "peak_rss_bytes": rss.peak})
                write_manifest(tmp, manifest)
        if owned:
            del src, pipe
            gc.collect()
    return manifest


def _check_image(pipe: Any, root: Path, manifest: Manifest, options: PipelineExportOptions,
                 on_step: Callable[[str], None]) -> Manifest:
    """Run the whole-image check and record it in the manifest's fidelity; a miss raises."""
    from enginekit.export.diffusion.image_check import image_parity

    on_step(f"checking a whole image against diffusers ({options.image_check_steps} steps)")
    report = image_parity(pipe, root, manifest, steps=options.image_check_steps, size=options.image_check_size,
                          seed=options.seed)
    report["budget_psnr_db"] = options.min_psnr
    if not report["psnr_db"] >= options.min_psnr:
        raise FidelityError(
            f"the exported pipeline's image is {report['psnr_db']:.1f} dB from diffusers' on the same latents "
            f"(budget {options.min_psnr} dB; {report['steps']} Euler steps at {report['width']}x{report['height']})"
        )
    return manifest.replace(fidelity={**manifest.fidelity, "image": report})


def _export_component(
    root: Path, plan: _Plan, opts: PipelineExportOptions, on_step: Callable[[str], None], i: int, n: int,
    release: Callable[[], None] | None = None,
) -> tuple[Component, dict[str, Any], str]:
    """Export one component and check it on ONNX Runtime against PyTorch's outputs (computed
    first); ``release``, when given, drops the PyTorch module between the two."""
    import torch

    folder = root / plan.name
    folder.mkdir()
    path = folder / "model.onnx"
    external = plan.n_bytes > _EXTERNAL_DATA_BYTES
    with torch.inference_mode():
        reference = plan.module(*plan.parity)
    reference = reference if isinstance(reference, tuple) else (reference,)
    ref = {spec.name: t.detach().float().numpy() for spec, t in zip(plan.outputs, reference)}
    del reference
    exporter = _torch_export(plan, path, opts.opset, external)
    _name_dims(path, plan)
    if release is not None:
        release()
    on_step(f"[{i}/{n}] {plan.name}: checking ONNX Runtime against PyTorch")
    feeds = {spec.name: t.numpy() for spec, t in zip(plan.inputs, plan.parity)}
    got = run_onnx_file(path, feeds)
    report = _judge(plan, ref, got, feeds, opts)
    report["exporter"] = exporter
    files = ["model.onnx"] + ([_DATA_FILE] if (folder / _DATA_FILE).exists() else [])
    comp = make_component(root, plan.name, f"{plan.name}/model.onnx", [f"{plan.name}/{f}" for f in files],
                          plan.inputs, plan.outputs, "fp32", fidelity=report)
    return comp, report, exporter


def _judge(plan: _Plan, ref: dict[str, np.ndarray], got: dict[str, np.ndarray], feeds: dict[str, np.ndarray],
           opts: PipelineExportOptions) -> dict[str, Any]:
    numbers = compare_outputs(ref, got)
    budgets = {name: opts.atol + opts.rtol * float(np.abs(r).max()) for name, r in ref.items()}
    misses = [
        f"{name} max abs {numbers[f'{name}_max_abs']:.3g} (budget {budgets[name]:.3g}), "
        f"cosine {numbers[f'{name}_cosine']:.6f} (budget {opts.min_cosine})"
        for name in ref
        if numbers[f"{name}_max_abs"] > budgets[name] or numbers[f"{name}_cosine"] < opts.min_cosine
    ]
    if misses:
        raise FidelityError(f"ONNX export of {plan.name} misses its parity budget: {'; '.join(misses)}")
    return {
        "reference": "pytorch",
        "runtime": "onnxruntime-cpu",
        "inputs": {name: {"shape": list(a.shape), "dtype": str(a.dtype)} for name, a in feeds.items()},
        "input_kind": f"seeded (seed {opts.seed})",
        "budget": {"atol": opts.atol, "rtol": opts.rtol, "min_cosine": opts.min_cosine,
                   "max_abs": {k: v for k, v in budgets.items()}},
        **numbers,
        "min_cosine": min(numbers[f"{n}_cosine"] for n in ref),
        "max_abs": max(numbers[f"{n}_max_abs"] for n in ref),
        "passed": True,
    }


def _torch_export(plan: _Plan, path: Path, opset: int, external: bool) -> str:
    """Export with the dynamo exporter; fall back to TorchScript's for this component only if it fails."""
    import torch

    in_names = [s.name for s in plan.inputs]
    out_names = [s.name for s in plan.outputs]
    dyn = tuple({j: d for j, d in enumerate(s.shape) if isinstance(d, str)} for s in plan.inputs)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(plan.module, plan.example, str(path), input_names=in_names, output_names=out_names,
                              opset_version=opset, dynamo=True, dynamic_shapes=dyn, external_data=external,
                              verbose=False)
        exporter = "dynamo"
    except Exception as first:
        for stale in path.parent.iterdir():
            stale.unlink()
        axes = {s.name: {j: d for j, d in enumerate(s.shape) if isinstance(d, str)} for s in (*plan.inputs, *plan.outputs)}
        try:
            with contextlib.redirect_stdout(sink), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(plan.module, plan.example, str(path), input_names=in_names, output_names=out_names,
                                  opset_version=opset, dynamo=False, dynamic_axes=axes)
        except Exception as exc:
            raise ExportError(f"torch.onnx.export of {plan.name} failed with both exporters: "
                              f"dynamo: {one_line(first)}; torchscript: {one_line(exc)}") from exc
        exporter = "torchscript"
        external = external or any(p.name != "model.onnx" for p in path.parent.iterdir())
    if external or any(p.name != "model.onnx" for p in path.parent.iterdir()):
        _one_data_file(path)
    return exporter


def _one_data_file(path: Path) -> None:
    """Gather every external tensor into ``model.onnx.data`` beside ``model.onnx``, whatever the exporter wrote."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    locations = {next((e.value for e in t.external_data if e.key == "location"), "")
                 for t in _get_all_tensors(model) if uses_external_data(t)}
    others = {p.name for p in path.parent.iterdir()} - {"model.onnx"}
    if locations == {_DATA_FILE} and others == {_DATA_FILE}:
        return
    del model
    model = onnx.load(str(path), load_external_data=True)
    for stale in path.parent.iterdir():
        if stale.name != "model.onnx":
            stale.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=_DATA_FILE, size_threshold=1024)


def _name_dims(path: Path, plan: _Plan) -> None:
    """Write the contract's symbolic names on the graph's inputs and outputs, and check the
    fixed ones, whatever names the exporter derived (``s0``, ``8*s1``)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    changed = False
    for values, specs in ((model.graph.input, plan.inputs), (model.graph.output, plan.outputs)):
        by_name = {v.name: v for v in values}
        for spec in specs:
            value = by_name.get(spec.name)
            if value is None:
                raise ExportError(f"{plan.name}: the exported graph has no {spec.name!r}")
            dims = value.type.tensor_type.shape.dim
            if len(dims) != len(spec.shape):
                raise ExportError(f"{plan.name}: {spec.name} has rank {len(dims)}, the contract says {len(spec.shape)}")
            for dim, want in zip(dims, spec.shape):
                if isinstance(want, str):
                    if dim.dim_param != want:
                        dim.dim_param = want
                        changed = True
                elif dim.HasField("dim_value") and dim.dim_value != want:
                    raise ExportError(f"{plan.name}: {spec.name} has a dim {dim.dim_value}, the contract says {want}")
                elif not dim.HasField("dim_value"):
                    dim.dim_value = int(want)
                    changed = True
    if changed:
        onnx.save_model(model, str(path))


# --------------------------------------------------------------------------- assets and task config


def _model_index(pipe: Any) -> dict[str, Any]:
    import diffusers

    index = {"_class_name": type(pipe).__name__, "_diffusers_version": diffusers.__version__}
    index.update({k: v for k, v in _jsonable(dict(pipe.config)).items() if not k.startswith("_")})
    return index


def _write_assets(root: Path, pipe: Any, task_config: dict[str, Any], model_index: dict[str, Any]) -> list[str]:
    from enginekit.export.diffusion.tokenizer import save_tokenizer

    rels: list[str] = []
    for enc in task_config["text_encoders"]:
        name = enc["tokenizer"]
        # T5 carries no usable model_max_length: the pipeline's max_sequence_length is the default.
        t5 = _is_t5(getattr(pipe, enc["component"]))
        length = task_config.get("max_sequence_length") if t5 else None
        cfg = save_tokenizer(getattr(pipe, name), root / name, max_length=length)
        cfg["file"] = f"{name}/{cfg['file']}"
        task_config["tokenizers"][name] = cfg
        rels.append(cfg["file"])
    pipe.scheduler.save_config(str(root / "scheduler"))
    rels.append("scheduler/scheduler_config.json")
    (root / "model_index.json").write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    rels.append("model_index.json")
    return rels


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


