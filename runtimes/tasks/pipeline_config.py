"""The ``text-to-image`` section of a manifest, as the torch-free runtime reads it.

The section is written at export by the family's registry entry
(``enginekit.export.diffusion.families``): the components, tokenizers, scheduler and VAE
scaling the pipeline needs, the runtime ``layout`` that runs it and the family's call
defaults (steps, guidance, size, scheduler, T5 tokens). Manifests written before those
fields existed still load: the defaults fall back to diffusers' SD ones (50 steps,
guidance 7.5, the model's own size and scheduler), and an old ``prompt_layout`` names the
layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from enginekit.errors import ManifestError

__all__ = ["PipelineConfig", "TextEncoderSpec", "default_scheduler_name"]

#: diffusers' scheduler classes -> our ports; a pipeline keeps its own unless told.
_PORTED = {
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler-a",
    "DDIMScheduler": "ddim",
    "DPMSolverMultistepScheduler": "dpm++2m",
    "LCMScheduler": "lcm",
    "FlowMatchEulerDiscreteScheduler": "flow-euler",
}

def default_scheduler_name(config: Mapping[str, Any]) -> str:
    """The port of the pipeline's own scheduler, or Euler when it has none (SD 1.5 ships PNDM)."""
    name = _PORTED.get(str(config.get("_class_name", "")), "euler")
    if name == "dpm++2m" and config.get("use_karras_sigmas"):
        return "dpm++2m-karras"
    return name


@dataclass(frozen=True)
class TextEncoderSpec:
    component: str
    tokenizer: str
    #: "last" (SD 1.x/2.x) or "penultimate" (SDXL) hidden state as the prompt embedding.
    hidden_state: str = "last"
    #: Whether this encoder's pooled output conditions the denoiser (SDXL's second encoder).
    use_pooled: bool = False


@dataclass(frozen=True)
class PipelineConfig:
    """The ``text-to-image`` section of a manifest, checked when the pipeline opens."""

    pipeline: str
    text_encoders: tuple[TextEncoderSpec, ...]
    tokenizers: Mapping[str, Mapping[str, Any]]
    scheduler: Mapping[str, Any]
    latent_channels: int
    vae_scale_factor: int
    vae_scaling_factor: float
    vae_shift_factor: float | None = None
    prediction_type: str = "epsilon"
    sample_size: int = 64
    denoiser: str = "unet"
    force_zeros_for_empty_prompt: bool = False
    requires_aesthetics_score: bool = False
    time_cond_proj_dim: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> PipelineConfig:
        where = "manifest.json section 'text-to-image'"
        required = ("pipeline", "text_encoders", "tokenizers", "scheduler", "latent_channels",
                    "vae_scale_factor", "vae_scaling_factor")
        missing = [k for k in required if k not in section]
        if missing:
            raise ManifestError(f"{where} has no {missing[0]!r} field (not a text-to-image artifact, or a damaged one)")
        try:
            encoders = tuple(
                TextEncoderSpec(component=str(e["component"]), tokenizer=str(e["tokenizer"]),
                                hidden_state=str(e.get("hidden_state", "last")), use_pooled=bool(e.get("use_pooled")))
                for e in section["text_encoders"]
            )
            proj = section.get("time_cond_proj_dim")
            shift = section.get("vae_shift_factor")
            known = {f for f in cls.__dataclass_fields__ if f not in ("text_encoders", "extra")}
            config = cls(
                pipeline=str(section["pipeline"]),
                text_encoders=encoders,
                tokenizers=dict(section["tokenizers"]),
                scheduler=dict(section["scheduler"]),
                latent_channels=int(section["latent_channels"]),
                vae_scale_factor=int(section["vae_scale_factor"]),
                vae_scaling_factor=float(section["vae_scaling_factor"]),
                vae_shift_factor=float(shift) if shift is not None else None,
                prediction_type=str(section.get("prediction_type", "epsilon")),
                sample_size=int(section.get("sample_size", 64)),
                denoiser=str(section.get("denoiser", "unet")),
                force_zeros_for_empty_prompt=bool(section.get("force_zeros_for_empty_prompt", False)),
                requires_aesthetics_score=bool(section.get("requires_aesthetics_score", False)),
                time_cond_proj_dim=int(proj) if proj is not None else None,
                extra={k: v for k, v in section.items() if k not in known and k != "text_encoders"},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{where} is malformed: {exc!r}") from None
        if not encoders:
            raise ManifestError(f"{where} lists no text encoders")
        for enc in encoders:
            if enc.hidden_state not in ("last", "penultimate"):
                raise ManifestError(f"{where}: hidden_state must be 'last' or 'penultimate', got {enc.hidden_state!r}")
            if enc.tokenizer not in config.tokenizers:
                raise ManifestError(f"{where}: text encoder {enc.component!r} names tokenizer {enc.tokenizer!r}, "
                                    "which the section does not describe")
        if config.vae_scale_factor < 1 or config.latent_channels < 1:
            raise ManifestError(f"{where}: vae_scale_factor and latent_channels must be positive")
        return config

    @property
    def default_size(self) -> int:
        """Side when the caller names none: the manifest's ``default_size``, else the model's own."""
        size = self.extra.get("default_size")
        return int(size) if size is not None else self.sample_size * self.vae_scale_factor

    @property
    def is_xl(self) -> bool:
        return any(e.use_pooled for e in self.text_encoders)

    @property
    def layout(self) -> str:
        """The name of the runtime layout that runs this pipeline (``runtimes.tasks.layouts``):
        the manifest's ``layout``, or for manifests written before it its ``prompt_layout``."""
        return str(self.extra.get("layout") or self.extra.get("prompt_layout") or "clip")

    @property
    def is_flow(self) -> bool:
        """A rectified-flow model (SD3, FLUX): sampled with flow-matching Euler only."""
        return self.prediction_type == "flow"

    @property
    def max_sequence_length(self) -> int:
        """T5 prompt tokens when the caller names none (the family's; SD3 256, FLUX dev 512)."""
        return int(self.extra.get("max_sequence_length", 256))

    @property
    def default_steps(self) -> int:
        """Steps when the caller names none: the family's (FLUX schnell 4, dev 28), else 50."""
        return int(self.extra.get("default_steps", 50))

    @property
    def default_guidance_scale(self) -> float:
        """Guidance when the caller names none: the family's (FLUX schnell 0, dev 3.5), else 7.5."""
        return float(self.extra.get("default_guidance_scale", 7.5))

    @property
    def default_scheduler(self) -> str:
        """Scheduler when the caller names none: the manifest's, else the port of the pipeline's own."""
        return str(self.extra.get("default_scheduler") or default_scheduler_name(self.scheduler))
