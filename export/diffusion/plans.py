"""Export plans: per component of a diffusion pipeline, the wrapped module, its IO specs and the seeded
inputs it is traced at and checked at (another batch and size, so the dynamic axes are exercised)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from enginekit.errors import ExportError
from enginekit.export.diffusion.controlnet import controlnet_plans, residual_feeds, residual_specs
from enginekit.export.diffusion.deepcache import CACHE_OUTPUT, cached_layer
from enginekit.export.diffusion.families import get_family
from enginekit.export.diffusion.unet_sizes import carry_skip_sizes
from enginekit.export.diffusion.wrappers import _wrappers
from enginekit.manifest import TensorSpec

if TYPE_CHECKING:
    from enginekit.export.diffusion.sd import PipelineExportOptions

__all__ = ["TEXT_ENCODERS", "_Plan", "_is_t5", "_plans"]

#: The text encoders' component names, in prompt order.
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
#: T5 prompt lengths traced and checked (two, so the sequence axis is exercised).
_T5_TRACE, _T5_PARITY = 32, 48


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
    names = [n for n in TEXT_ENCODERS if getattr(pipe, n, None) is not None]
    denoiser_and_vae = _TRANSFORMER_PLANS.get(get_family(family).plan, _unet_and_vae)
    return [_text_plan(pipe, n, W, gen, opts) for n in names] + denoiser_and_vae(pipe, W, gen, opts, _nbytes)


def _nbytes(m: Any) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters())


def _text_plan(pipe: Any, name: str, W: dict[str, type], gen: Any, opts: PipelineExportOptions) -> Callable[[], _Plan]:
    """A CLIP text encoder's plan (or a T5's, :func:`_t5_plan`), made when its turn comes."""
    B, PB, L = opts.trace_batch, opts.parity_batch, opts.sequence_length

    def make() -> _Plan:
        enc = getattr(pipe, name)
        cfg = enc.config
        if _is_t5(enc):
            return _t5_plan(name, enc, W, gen, opts)
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
            _nbytes(enc),
        )
    return make


def _t5_plan(name: str, enc: Any, W: dict[str, type], gen: Any, opts: PipelineExportOptions) -> _Plan:
    cfg = enc.config
    seq = ("batch", "sequence")
    # Traced and checked at two lengths: T5's relative positions take any.
    return _Plan(
        name, W["t5"](enc).eval(),
        [TensorSpec("input_ids", "int64", seq)],
        [TensorSpec("last_hidden_state", "float32", (*seq, int(cfg.d_model)))],
        (_t5_ids(gen, opts.trace_batch, _T5_TRACE, cfg.vocab_size),),
        (_t5_ids(gen, opts.parity_batch, _T5_PARITY, cfg.vocab_size),),
        _nbytes(enc),
    )


def _unet_and_vae(pipe: Any, W: dict[str, type], gen: Any, opts: PipelineExportOptions,
                  nbytes: Callable[[Any], int]) -> list[Callable[[], _Plan]]:
    """The UNet denoiser (SD 1.x, 2.x, SDXL, LCM), then the VAE."""
    import torch

    B, PB, L = opts.trace_batch, opts.parity_batch, opts.sequence_length
    unet_cfg = pipe.unet.config
    f = 2 ** (len(unet_cfg.block_out_channels) - 1)
    vae_f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    # Traced at one aspect, checked at the transposed one: both axes move.
    trace_hw, parity_hw = (2 * f, 3 * f), (3 * f, 2 * f)
    C = int(unet_cfg.in_channels)
    lat = ("batch", C, "latent_height", "latent_width")

    D = int(unet_cfg.cross_attention_dim)
    extra: list[tuple[str, tuple[Any, ...]]] = []
    if unet_cfg.addition_embed_type == "text_time":
        text_dim = int(unet_cfg.projection_class_embeddings_input_dim) - 6 * int(unet_cfg.addition_time_embed_dim)
        extra += [("text_embeds", ("batch", text_dim)), ("time_ids", ("batch", 6))]
    elif unet_cfg.addition_embed_type is not None:
        raise ExportError(f"UNet addition_embed_type {unet_cfg.addition_embed_type!r} is not supported")
    if unet_cfg.time_cond_proj_dim is not None:
        extra.append(("timestep_cond", ("batch", int(unet_cfg.time_cond_proj_dim))))
    controlled = getattr(pipe, "controlnet", None) is not None

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

    def unet() -> _Plan:
        u = pipe.unet
        # Every latent size diffusers' UNet takes, odd sides included; checked at odd sides.
        check_hw = (parity_hw[0] + 1, parity_hw[1] - 1) if carry_skip_sizes(u) else parity_hw
        inputs = [TensorSpec("sample", "float32", lat), TensorSpec("timestep", "float32", ("batch",)),
                  TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", D))]
        inputs += [TensorSpec(n, "float32", s) for n, s in extra]
        out_c = int(unet_cfg.out_channels)
        outputs = [TensorSpec("out_sample", "float32", ("batch", out_c, "latent_height", "latent_width"))]
        # A ControlNet pipeline's UNet takes the residuals (and gives no DeepCache feature).
        cache_layer = cached_layer(u) if not controlled else None
        if cache_layer is not None:  # DeepCache's reused feature, at the latent's size
            outputs.append(TensorSpec(CACHE_OUTPUT, "float32", ("batch", int(unet_cfg.block_out_channels[0]),
                                                                "latent_height", "latent_width")))
        trace, check = feeds(B, trace_hw), feeds(PB, check_hw)
        if controlled:
            inputs += residual_specs(unet_cfg)
            trace += tuple(residual_feeds(unet_cfg, B, trace_hw, gen))
            check += tuple(residual_feeds(unet_cfg, PB, check_hw, gen))
        module = W["unet"](u, tuple(n for n, _ in extra), cache_layer, len(residual_specs(unet_cfg)) if controlled else 0)
        return _Plan("unet", module.eval(), inputs, outputs, trace, check, nbytes(u))

    def extra_feeds(batch: int, hw: tuple[int, int]) -> tuple[Any, ...]:
        return feeds(batch, hw)[3:]

    controls = controlnet_plans(pipe, W, gen, opts, nbytes, trace_hw, parity_hw, extra, extra_feeds) \
        if controlled else []
    return [unet, *controls, *_vae_plans(pipe, W, gen, opts, nbytes, trace_hw, parity_hw)]


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


#: The transformer families' denoiser plans, by the family's ``plan`` (any other: :func:`_unet_and_vae`).
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
