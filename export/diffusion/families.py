"""The diffusion families, one registered object each (as timm registers its models).

A :class:`DiffusionFamily` owns everything that differs between families on the export
side: the configs enginekit ships for it (``enginekit/configs/<name>``), how a pipeline
folder or a single-file checkpoint is recognised as it, which diffusers pipeline class
loads it and with which arguments, its denoiser's export plan, its precision exceptions
(SDXL's VAE stays fp32), its tokenizer rules (T5 or not, and whether ``--no-t5`` is
allowed), the manifest's ``text-to-image`` section and the call defaults that section
carries (steps, guidance, size, scheduler, T5 tokens). Code elsewhere asks the family;
it never compares family names.

A new SD-like family is one ``@register_family`` entry here plus its config folders::

    @register_family
    def sd15() -> DiffusionFamily:
        return UNetFamily(name="sd15", pipeline_class="StableDiffusionPipeline", ...)

The names are the ones manifests record (``sd15``, ``sd21``, ``sdxl``, ``sd3``, ``flux``):
SD 3 and 3.5 share the ``sd3`` family (their configs differ, their pipeline does not), and
FLUX.1 dev and schnell are variants of ``flux`` with their own call defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from enginekit.errors import SourceError
from enginekit.export.json_files import jsonable, read_json

__all__ = ["CallDefaults", "DiffusionFamily", "UNetFamily", "SD3Family", "FluxFamily", "register_family",
           "get_family", "family_names", "families", "detect_family", "family_of_config", "check_family",
           "is_inpainting_checkpoint"]

_REGISTRY: dict[str, DiffusionFamily] = {}

#: The text encoder components a pipeline may have, in order.
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
#: Components diffusers takes as None when model_index leaves them out (T5, IP-adapter parts).
_OPTIONAL = ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")


@dataclass(frozen=True)
class CallDefaults:
    """What a call that names nothing runs: written into the manifest at export, read by the
    library, the CLI and the server. ``size`` None is the model's own (sample size x VAE
    factor); ``scheduler`` None is the pipeline's own scheduler where ported."""

    steps: int = 50
    guidance_scale: float = 7.5
    size: int | None = None
    scheduler: str | None = None
    max_sequence_length: int | None = None

    def section(self) -> dict[str, Any]:
        """The manifest's fields for these defaults (absent ones are left out)."""
        out: dict[str, Any] = {"default_steps": self.steps, "default_guidance_scale": self.guidance_scale}
        if self.size is not None:
            out["default_size"] = self.size
        if self.scheduler is not None:
            out["default_scheduler"] = self.scheduler
        if self.max_sequence_length is not None:
            out["max_sequence_length"] = self.max_sequence_length
        return out


@dataclass(frozen=True)
class DiffusionFamily:
    """One diffusion family. Subclasses build its manifest section (:meth:`task_config`)."""

    name: str
    title: str
    #: diffusers' pipeline class (model_index.json's ``_class_name``).
    pipeline_class: str
    #: The runtime layout that runs it (``enginekit.runtimes.tasks.layouts``).
    layout: str
    #: The denoiser component and its export plan (``unet``, ``mmdit``, ``flux``).
    denoiser: str = "unet"
    plan: str = "unet"
    #: Published architectures enginekit ships configs for (``--random-weights``) and tiny twins.
    configs: tuple[str, ...] = ()
    builtins: tuple[str, ...] = ()
    #: T5: "none" (no T5 encoder), "optional" (``--no-t5`` leaves it out) or "required".
    t5: str = "none"
    no_t5_reason: str = ""
    #: The pipeline class takes safety_checker/feature_extractor arguments (SD 1.x/2.x).
    has_safety_checker: bool = False
    #: Single-file (LDM) checkpoints: the text-encoder key prefix that tells the family, and
    #: the text encoders stored in OpenCLIP layout.
    single_file_prefix: str | None = None
    open_clip_encoders: tuple[str, ...] = ()
    #: Which SD pipeline class folders are this family: by the UNet's cross-attention width,
    #: or (a non-standard width) by the first text encoder's activation.
    cross_attention_dim: int | None = None
    text_activation: str | None = None
    #: The pipeline class takes ``force_zeros_for_empty_prompt`` (SDXL: an empty negative is zeros).
    force_zeros_flag: bool = False
    #: The VAE overflows in fp16 when its config asks for an upcast (SDXL): it stays fp32.
    vae_honours_upcast: bool = False
    defaults: CallDefaults = field(default_factory=CallDefaults)
    #: The T5 encoder's component, where the family has one (its weight-format default differs).
    t5_component: str | None = None
    #: diffusers' inpainting pipeline class, where the family has inpainting models (a UNet whose
    #: input holds the mask and the masked image's latents beside the latents).
    inpaint_class: str | None = None

    def pipeline_classes(self) -> tuple[str, ...]:
        """The model_index.json classes that are this family."""
        return (self.pipeline_class,) + ((self.inpaint_class,) if self.inpaint_class else ())

    def loading_class(self, index: Mapping[str, Any] | None) -> str:
        """The diffusers class that loads a folder whose model_index is ``index`` (its own, if the family's)."""
        name = (index or {}).get("_class_name")
        return name if name in self.pipeline_classes() else self.pipeline_class

    # ------------------------------------------------------------------ recognition

    def recognise(self, folder: Path | None, index: Mapping[str, Any]) -> tuple[str, bool] | None:
        """(how it was told, whether that is certain) when ``index`` (a model_index.json) is
        this family, else None. ``folder`` gives the component configs where they are needed."""
        if index.get("_class_name") not in self.pipeline_classes():
            return None
        if self.cross_attention_dim is None and self.text_activation is None:
            return "pipeline class", True
        unet_cfg = read_json(folder / "unet" / "config.json") if folder and (folder / "unet" / "config.json").is_file() else {}
        dim = unet_cfg.get("cross_attention_dim")
        if dim == self.cross_attention_dim:
            return f"unet cross_attention_dim {dim}", True
        if dim in {f.cross_attention_dim for f in _REGISTRY.values() if f.pipeline_class == self.pipeline_class}:
            return None  # another family's width
        te_cfg = folder / "text_encoder" / "config.json" if folder else None
        act = read_json(te_cfg).get("hidden_act") if te_cfg and te_cfg.is_file() else None
        siblings = [f for f in _REGISTRY.values() if f.pipeline_class == self.pipeline_class and f.text_activation]
        if act == self.text_activation or (self.text_activation is None and all(f.text_activation != act for f in siblings)):
            return f"text encoder activation {act!r}", False
        return None

    def no_t5_error(self) -> str | None:
        """Why ``--no-t5`` is refused for this family, or None where it is allowed."""
        if self.t5 == "optional":
            return None
        return self.no_t5_reason or f"{self.name} has no T5 encoder"

    def weight_formats(self, components: Sequence[str], asked: str) -> dict[str, str]:
        """Each component's weight format when ``asked`` is given for the pipeline: the denoiser
        as asked; T5 int8 when the denoiser is int8 or int4 (else as asked); the CLIP encoders fp16
        when fp16 is asked, else fp32; the VAE (and anything else) fp32."""
        compressed = asked in ("int8", "int4")
        out = {}
        for name in components:
            if name == self.denoiser:
                out[name] = asked
            elif name == self.t5_component:
                out[name] = "int8" if compressed else asked
            elif name in TEXT_ENCODERS:
                out[name] = "fp16" if asked == "fp16" else "fp32"
            else:
                out[name] = "fp32"
        return out

    # ------------------------------------------------------------------ loading

    def pipeline_kwargs(self, index: Mapping[str, Any], *, loading: bool) -> dict[str, Any]:
        """Extra arguments for the pipeline class: no safety checker; optional components
        absent from ``index`` as None when ``loading`` a folder."""
        kwargs: dict[str, Any] = {}
        if self.has_safety_checker:
            kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if loading and self.t5 != "none":
            for name in _OPTIONAL:
                entry = index.get(name)
                if not (isinstance(entry, list) and entry and entry[0] is not None):
                    kwargs[name] = None
        return kwargs

    def variant(self, pipe: Any) -> str | None:
        """The variant a loaded pipeline is (FLUX dev or schnell), None for one-variant families."""
        return None

    def call_defaults(self, pipe: Any) -> CallDefaults:
        return self.defaults

    # ------------------------------------------------------------------ the manifest

    def task_config(self, pipe: Any) -> dict[str, Any]:
        """The manifest's ``text-to-image`` section for ``pipe`` (tokenizers filled in later)."""
        raise NotImplementedError

    def _common(self, pipe: Any, sample_size: int) -> dict[str, Any]:
        vae = pipe.vae.config
        vsf = 2 ** (len(vae.block_out_channels) - 1)
        defaults = self.call_defaults(pipe)
        sched = jsonable(dict(pipe.scheduler.config))
        section = {
            "pipeline": type(pipe).__name__,
            "denoiser": self.denoiser,
            "layout": self.layout,
            "tokenizers": {},  # filled when the tokenizers are written
            "scheduler": sched,
            "latent_channels": int(vae.latent_channels),
            "vae_scale_factor": vsf,
            "vae_scaling_factor": float(vae.scaling_factor),
            "vae_shift_factor": None if vae.get("shift_factor") is None else float(vae.shift_factor),
            "prediction_type": sched.get("prediction_type", "epsilon"),
            "sample_size": sample_size,
            "vae_precision": "fp32" if self.vae_honours_upcast and vae.get("force_upcast", True) else "any",
            **defaults.section(),
        }
        if defaults.scheduler is None:
            from enginekit.runtimes.tasks.pipeline_config import default_scheduler_name

            section["default_scheduler"] = default_scheduler_name(sched)
        if defaults.size is None:
            section["default_size"] = sample_size * vsf
        if self.variant(pipe) is not None:
            section["variant"] = self.variant(pipe)
        return section


def _encoders(pipe: Any) -> list[str]:
    return [n for n in TEXT_ENCODERS if getattr(pipe, n, None) is not None]


def _vocab_sizes(pipe: Any, names: list[str]) -> dict[str, int]:
    return {n: int(getattr(pipe, n).config.vocab_size) for n in names}


@dataclass(frozen=True)
class UNetFamily(DiffusionFamily):
    """SD 1.x, 2.x and XL: CLIP encoders side by side, a UNet. ``penultimate`` and
    ``pooled_encoder`` say which hidden state and which pooled output condition it (SDXL)."""

    penultimate: bool = False
    pooled_encoder: str | None = None

    def task_config(self, pipe: Any) -> dict[str, Any]:
        unet = pipe.unet.config
        names = [n for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]
        xl = unet.addition_embed_type == "text_time"
        latent = int(pipe.vae.config.latent_channels)
        if int(unet.in_channels) not in (latent, 2 * latent + 1):
            from enginekit.errors import ExportError

            raise ExportError(f"the UNet takes {unet.in_channels} input channels: neither the VAE's {latent} latent "
                              f"channels nor an inpainting UNet's {2 * latent + 1} (latents, mask, masked image)")
        return {
            **self._common(pipe, int(unet.sample_size)),
            # An inpainting UNet: the mask and the masked image's latents join the latents every step.
            "inpainting": int(unet.in_channels) == 2 * latent + 1,
            "text_encoders": [
                {"component": n, "tokenizer": "tokenizer" + n[len("text_encoder"):],
                 "hidden_state": "penultimate" if self.penultimate else "last", "use_pooled": n == self.pooled_encoder}
                for n in names],
            "force_zeros_for_empty_prompt": bool(pipe.config.get("force_zeros_for_empty_prompt", False)),
            "requires_aesthetics_score": bool(pipe.config.get("requires_aesthetics_score", False)),
            "time_cond_proj_dim": None if unet.time_cond_proj_dim is None else int(unet.time_cond_proj_dim),
            "addition_time_embed_dim": int(unet.addition_time_embed_dim) if xl else None,
            "text_encoder_vocab_sizes": _vocab_sizes(pipe, names),
        }


@dataclass(frozen=True)
class SD3Family(DiffusionFamily):
    """SD 3 / 3.5: CLIP-L and CLIP-G penultimate states and pooled outputs, T5's last state
    when the pipeline has T5 (zeros of the joint width when not, as diffusers does)."""

    def task_config(self, pipe: Any) -> dict[str, Any]:
        tr = pipe.transformer.config
        names = _encoders(pipe)
        return {
            **self._common(pipe, int(tr.sample_size)),
            "text_encoders": [
                {"component": n, "tokenizer": "tokenizer" + n[len("text_encoder"):],
                 "hidden_state": "last" if n == "text_encoder_3" else "penultimate", "use_pooled": n != "text_encoder_3"}
                for n in names],
            "prediction_type": "flow",
            "patch_size": int(tr.patch_size),
            # Its position crop takes at most this many patches a side (diffusers raises beyond).
            "pos_embed_max_size": None if tr.get("pos_embed_max_size") is None else int(tr.pos_embed_max_size),
            "joint_attention_dim": int(tr.joint_attention_dim),
            "force_zeros_for_empty_prompt": False,
            "time_cond_proj_dim": None,
            "text_encoder_vocab_sizes": _vocab_sizes(pipe, names),
        }


@dataclass(frozen=True)
class FluxFamily(DiffusionFamily):
    """FLUX.1: CLIP's pooled output and T5's last state; packed latents. ``variants`` holds
    each variant's call defaults: dev (guidance-distilled, a guidance input) and schnell
    (timestep-distilled, none)."""

    variants: Mapping[str, CallDefaults] = field(default_factory=dict)

    def variant(self, pipe: Any) -> str | None:
        return "dev" if bool(pipe.transformer.config.guidance_embeds) else "schnell"

    def call_defaults(self, pipe: Any) -> CallDefaults:
        return self.variants[self.variant(pipe) or "dev"]

    def task_config(self, pipe: Any) -> dict[str, Any]:
        tr, vae = pipe.transformer.config, pipe.vae.config
        vsf = 2 ** (len(vae.block_out_channels) - 1)
        sample = int(getattr(pipe, "default_sample_size", 128)) if int(vae.sample_size) >= 512 else int(vae.sample_size) // vsf
        return {
            **self._common(pipe, sample),
            "text_encoders": [
                {"component": "text_encoder", "tokenizer": "tokenizer", "hidden_state": "last", "use_pooled": True},
                {"component": "text_encoder_2", "tokenizer": "tokenizer_2", "hidden_state": "last", "use_pooled": False},
            ],
            "prediction_type": "flow",
            "packed_latents": True,
            "guidance_embeds": bool(tr.guidance_embeds),
            "joint_attention_dim": int(tr.joint_attention_dim),
            "force_zeros_for_empty_prompt": False,
            "time_cond_proj_dim": None,
            "text_encoder_vocab_sizes": _vocab_sizes(pipe, ["text_encoder", "text_encoder_2"]),
        }


# --------------------------------------------------------------------------- the registry


def register_family(fn: Callable[[], DiffusionFamily]) -> Callable[[], DiffusionFamily]:
    """Decorator: register the family ``fn()`` builds under its name (a second entry of a
    name is an error, not a warning)."""
    family = fn()
    if family.name in _REGISTRY:
        raise ValueError(f"diffusion family {family.name!r} is registered twice")
    _REGISTRY[family.name] = family
    return fn


def family_names() -> tuple[str, ...]:
    """The registered family names, in registration order."""
    return tuple(_REGISTRY)


def families() -> tuple[DiffusionFamily, ...]:
    return tuple(_REGISTRY.values())


def get_family(name: str) -> DiffusionFamily:
    """The family registered as ``name``; an unknown name is a one-line :class:`SourceError`."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SourceError(f"unknown family {name!r}; the diffusion families are {', '.join(_REGISTRY)}") from None


def family_of_config(name: str) -> DiffusionFamily | None:
    """The family a shipped config (a built-in twin or a published architecture) belongs to."""
    return next((f for f in _REGISTRY.values() if name in f.configs or name in f.builtins), None)


def detect_family(source: str | Path | Mapping[str, Any]) -> tuple[DiffusionFamily, str, bool]:
    """(family, how it was told, whether that is certain) for a pipeline folder or its parsed
    model_index.json. An SD 1.x/2.x folder of a non-standard width is told by its text
    encoder's activation: not certain, so ``--family`` may overrule it within its class."""
    if isinstance(source, Mapping):
        folder, index = None, source
    else:
        folder = Path(source)
        if not (folder / "model_index.json").is_file():
            raise SourceError(f"{folder}: no model_index.json (expected a diffusers pipeline written by save_pretrained)")
        index = read_json(folder / "model_index.json")
    for family in _REGISTRY.values():
        found = family.recognise(folder, index)
        if found is not None:
            return family, found[0], found[1]
    classes = sorted({c for f in _REGISTRY.values() for c in f.pipeline_classes()})
    raise SourceError(f"{folder or 'model_index.json'}: model_index.json names {index.get('_class_name')!r}; "
                      f"the export takes {', '.join(classes)}")


def is_inpainting_checkpoint(header: Mapping[str, Any]) -> bool:
    """A single-file (LDM) checkpoint whose UNet takes the mask and the masked image beside the
    latents: its first convolution's 9 input channels (``header``: key -> tensor or meta tensor)."""
    first = header.get("model.diffusion_model.input_blocks.0.0.weight")
    return first is not None and first.ndim == 4 and int(first.shape[1]) == 9


def check_family(where: str, detected: str, asked: str | None, *, how: str | None = None,
                 certain: bool = True) -> str:
    """The family to use when ``asked`` (``--family``) meets the ``detected`` one: they must
    agree, unless detection was not ``certain`` and both load with the same pipeline class
    (an SD 1.x or 2.x of a width the folder cannot tell by): then the caller decides."""
    if asked is None or asked == detected:
        return detected
    if not certain and get_family(asked).pipeline_class == get_family(detected).pipeline_class:
        return asked
    get_family(asked)
    if how is None:
        raise SourceError(f"{where} is a {detected} pipeline, not {asked} (--family {asked})")
    raise SourceError(f"{where}: a {detected} pipeline by its {how}, not {asked} (--family {asked})")


# --------------------------------------------------------------------------- the families

_FLUX_NEEDS_T5 = "FLUX conditions on T5 and cannot run without it"


@register_family
def sd15() -> DiffusionFamily:
    return UNetFamily(name="sd15", title="Stable Diffusion 1.x", pipeline_class="StableDiffusionPipeline",
                      inpaint_class="StableDiffusionInpaintPipeline", layout="clip",
                      configs=("sd15", "sd15-inpainting"), builtins=("tiny-sd15", "tiny-sd15-inpainting"),
                      has_safety_checker=True,
                      single_file_prefix="cond_stage_model.transformer.", cross_attention_dim=768,
                      text_activation="quick_gelu")


@register_family
def sd21() -> DiffusionFamily:
    # SD 2.x encodes with OpenCLIP (gelu); a folder of another width is told by that.
    return UNetFamily(name="sd21", title="Stable Diffusion 2.x", pipeline_class="StableDiffusionPipeline",
                      inpaint_class="StableDiffusionInpaintPipeline", layout="clip", configs=("sd21",), has_safety_checker=True,
                      single_file_prefix="cond_stage_model.model.", open_clip_encoders=("text_encoder",),
                      cross_attention_dim=1024)


@register_family
def sdxl() -> DiffusionFamily:
    # diffusers' StableDiffusionXLPipeline call defaults: 50 steps at guidance 5.0.
    return UNetFamily(name="sdxl", title="Stable Diffusion XL", pipeline_class="StableDiffusionXLPipeline",
                      inpaint_class="StableDiffusionXLInpaintPipeline", layout="clip",
                      configs=("sdxl", "sdxl-inpainting"), builtins=("tiny-sdxl", "tiny-sdxl-inpainting"),
                      single_file_prefix="conditioner.embedders.1.model.", open_clip_encoders=("text_encoder_2",),
                      vae_honours_upcast=True, force_zeros_flag=True, penultimate=True, pooled_encoder="text_encoder_2",
                      defaults=CallDefaults(steps=50, guidance_scale=5.0))


@register_family
def sd3() -> DiffusionFamily:
    # SD 3.5's pipeline is SD 3's: Medium and Large are configs of this family. StableDiffusion3Pipeline's
    # call defaults: 28 steps at guidance 7.0, 256 T5 tokens.
    return SD3Family(name="sd3", title="Stable Diffusion 3 / 3.5", pipeline_class="StableDiffusion3Pipeline",
                     layout="sd3", denoiser="transformer", plan="mmdit",
                     configs=("sd3-medium", "sd35-medium", "sd35-large"), builtins=("tiny-sd3", "tiny-sd35"),
                     t5="optional", t5_component="text_encoder_3",
                     defaults=CallDefaults(steps=28, guidance_scale=7.0, max_sequence_length=256))


@register_family
def flux() -> DiffusionFamily:
    # dev as diffusers' FluxPipeline defaults it (28 steps, embedded guidance 3.5, 512 T5 tokens);
    # schnell as its model card (timestep-distilled: 4 steps, guidance 0, 256 tokens).
    return FluxFamily(name="flux", title="FLUX.1", pipeline_class="FluxPipeline", layout="flux",
                      denoiser="transformer", plan="flux", configs=("flux-dev", "flux-schnell"),
                      builtins=("tiny-flux",), t5="required", no_t5_reason=_FLUX_NEEDS_T5,
                      t5_component="text_encoder_2",
                      variants={"dev": CallDefaults(steps=28, guidance_scale=3.5, max_sequence_length=512),
                                "schnell": CallDefaults(steps=4, guidance_scale=0.0, max_sequence_length=256)})
