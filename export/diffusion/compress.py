"""Weight compression of an exported diffusion pipeline, component by component.

:func:`compress_pipeline` reads a float ONNX pipeline (from ``enginekit export``) and
writes one whose components carry the weight format their family gives them
(:meth:`DiffusionFamily.weight_formats`: the denoiser as asked, T5 int8 when the
denoiser is int8 or int4, CLIP fp32 or fp16, the VAE fp32), each compressed tensor
by tensor by :func:`enginekit.export.compress.compress_component`. The manifest
records per component the format, group size, ratio, sym and the layers that stayed
in higher precision. The result is an ONNX artifact that ``enginekit compile`` takes
for ONNX Runtime and OpenVINO alike (both read MatMulNBits).

With ``gate`` given, the compressed pipeline is judged on the image against its float
parent with the quantizer's gate (:mod:`enginekit.quant.diffusion_gate`, the budgets
of :data:`enginekit.quant.diffusion.BUDGETS`); a miss writes nothing. It needs the
float parent to run, so a model too large for that is compressed without it.
"""

from __future__ import annotations

import resource
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from enginekit.artifact import atomic_artifact, copy_assets, make_component, verify_artifact, write_manifest
from enginekit.errors import QuantizationError
from enginekit.export.compress import WeightFormat, compress_component, written_files
from enginekit.manifest import Component, Manifest, read_manifest

__all__ = ["compress_pipeline", "plan_formats", "formats_for", "format_record", "export_compressed",
           "pipeline_formats", "streamed_record"]


def _as_format(value: WeightFormat | str, base: WeightFormat) -> WeightFormat:
    """A format given by name takes the pipeline's group size, ratio and sym."""
    return value if isinstance(value, WeightFormat) else replace(base, mode=str(value))


def plan_formats(manifest: Manifest, default_format: WeightFormat | str,
                 per_component: Mapping[str, WeightFormat | str] | None = None) -> dict[str, WeightFormat]:
    """Each of ``manifest``'s components' :class:`WeightFormat`: see :func:`formats_for`."""
    return formats_for(manifest.family, list(manifest.components), default_format, per_component)


def formats_for(family_name: str, names: Sequence[str], default_format: WeightFormat | str,
                per_component: Mapping[str, WeightFormat | str] | None = None) -> dict[str, WeightFormat]:
    """Each component's :class:`WeightFormat` (``names``, a ``family_name`` pipeline's): the
    family's defaults for ``default_format``, then ``per_component`` over them."""
    from enginekit.export.diffusion.families import get_family

    base = default_format if isinstance(default_format, WeightFormat) else WeightFormat(mode=str(default_format))
    family = get_family(family_name)
    plan = {name: _as_format(mode, base) for name, mode in family.weight_formats(names, base.mode).items()}
    for name, value in (per_component or {}).items():
        if name not in names:
            raise QuantizationError(f"unknown component {name!r}; this {family_name} pipeline has: "
                                    f"{', '.join(names)}")
        plan[name] = _as_format(value, base)
    return plan


def pipeline_formats(pipe: Any, family_name: str, default_format: WeightFormat | str | None,
                     per_component: Mapping[str, WeightFormat | str] | None = None) -> dict[str, WeightFormat]:
    """:func:`formats_for` the components a streamed export of ``pipe`` writes (an unknown name in
    ``per_component`` refused before anything is exported)."""
    from enginekit.export.diffusion.families import get_family
    from enginekit.export.diffusion.plans import TEXT_ENCODERS

    names = [*(n for n in TEXT_ENCODERS if getattr(pipe, n, None) is not None), get_family(family_name).denoiser,
             "vae_decoder", "vae_encoder"]
    return formats_for(family_name, names, default_format or "fp32", per_component)


def streamed_record(formats: Mapping[str, WeightFormat], components: Mapping[str, Component], family_name: str,
                    ) -> dict[str, Any]:
    """The manifest's ``quantization`` of a streamed export that compressed on the way (the shape
    :func:`compress_pipeline` writes)."""
    from enginekit.export.diffusion.families import get_family

    return {"method": "weight-compression", "stage": "export (streamed)",
            **format_record(formats, get_family(family_name).denoiser),
            "components": {name: comp.quantization for name, comp in components.items()}}


def format_record(plan: Mapping[str, WeightFormat], denoiser: str) -> dict[str, Any]:
    """The pipeline-level summary of ``plan``: the denoiser's format and its options."""
    fmt = plan.get(denoiser) or next(iter(plan.values()))
    return {"weight_format": fmt.mode, **{k: v for k, v in fmt.record().items() if k != "format"}}


def compress_pipeline(artifact_dir: str | Path, out_dir: str | Path, default_format: WeightFormat | str,
                      per_component: Mapping[str, WeightFormat | str] | None = None, *, overwrite: bool = False,
                      gate: Any = None, min_psnr: float | None = None, min_ssim: float | None = None,
                      on_step: Callable[[str], None] = lambda msg: None) -> Manifest:
    """Compress the float ONNX pipeline ``artifact_dir`` into ``out_dir``.

    ``default_format`` (a :class:`WeightFormat` or its mode: fp32, fp16, int8, int4) is the
    denoiser's; the other components take their family's defaults, and ``per_component``
    (``{"text_encoder_2": "int4"}``) overrides them. ``gate`` (a :class:`GateSpec`) judges
    the result's images against the float parent, under ``min_psnr`` dB / ``min_ssim``
    (defaults: the quantizer's budgets for the denoiser's format).
    """
    started = time.monotonic()
    root = Path(artifact_dir)
    parent = read_manifest(root)
    verify_artifact(root, parent)
    # A pipeline's manifest names its denoiser; a classifier's has none.
    if not parent.task_config.get("denoiser") or parent.kind != "onnx" or parent.quantization:
        what = f"{parent.kind} {parent.task}" + (" (already quantized)" if parent.quantization else "")
        raise QuantizationError(f"{root}: compress takes a float ONNX pipeline from export; this one is {what}")
    plan = plan_formats(parent, default_format, per_component)
    budget = _budget(parent, plan, min_psnr, min_ssim) if gate is not None else None
    with atomic_artifact(out_dir, overwrite=overwrite, inputs=(root,)) as tmp:
        comps: dict[str, Component] = {}
        records: dict[str, Any] = {}
        for i, (name, comp) in enumerate(parent.components.items(), 1):
            fmt = plan[name]
            on_step(f"[{i}/{len(plan)}] {name}: {fmt.mode}")
            rel = Path(comp.entry).parent
            entry = Path(comp.entry).name
            record = compress_component(root / rel, fmt, tmp / rel, entry=entry)
            files = [str(rel / f) for f in written_files(tmp / rel, entry)]
            comps[name] = make_component(tmp, name, comp.entry, files, comp.inputs, comp.outputs, fmt.mode,
                                         quantization=record, fidelity=comp.fidelity if fmt.mode == "fp32" else None)
            records[name] = record
        copy_assets(root, tmp, parent)
        manifest = parent.replace(
            components=comps,
            quantization={"method": "weight-compression", "stage": "export", **_format_record(plan, parent),
                          "components": records},
            provenance={**parent.provenance,
                        "parent": {"path": str(root.resolve()), "manifest_sha256": parent.digest(),
                                   "kind": parent.kind},
                        "compress": {"seconds": round(time.monotonic() - started, 1),
                                     # ru_maxrss is KiB on Linux: the process's peak so far.
                                     "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}},
            fidelity={"export": parent.fidelity} if parent.fidelity else {},
        )
        write_manifest(tmp, manifest)
        if gate is not None:
            manifest = _judge(root, parent, tmp, manifest, plan, gate, budget, on_step)
            write_manifest(tmp, manifest)
    return manifest


def _format_record(plan: Mapping[str, WeightFormat], parent: Manifest) -> dict[str, Any]:
    return format_record(plan, str(parent.task_config.get("denoiser", "")))


def _budget(parent: Manifest, plan: Mapping[str, WeightFormat], min_psnr: float | None,
            min_ssim: float | None) -> tuple[float, float]:
    from enginekit.quant.diffusion import BUDGETS

    denoiser = str(parent.task_config.get("denoiser", ""))
    default = BUDGETS.get(plan[denoiser].mode, BUDGETS["fp16"]) if denoiser in plan else BUDGETS["fp16"]
    return (default[0] if min_psnr is None else float(min_psnr), default[1] if min_ssim is None else float(min_ssim))


def _judge(root: Path, parent: Manifest, tmp: Path, manifest: Manifest, plan: Mapping[str, WeightFormat],
           gate: Any, budget: tuple[float, float], on_step: Callable[[str], None]) -> Manifest:
    """The quantizer's image gate: the float parent's images against the compressed pipeline's."""
    from enginekit.quant.diffusion_gate import check_budget, gate_report, open_pipeline, reference_images

    float_pipe = open_pipeline(root, parent, "onnxruntime")
    try:
        ref = reference_images(parent, float_pipe, gate, "parent", on_step)
        on_step("generating the gate images with the compressed pipeline")
        pipe = open_pipeline(tmp, manifest, "onnxruntime")
        try:
            report = gate_report(float_pipe, pipe, ref, gate, {n: f.mode for n, f in plan.items()}, budget)
        finally:
            pipe.close()
    finally:
        float_pipe.close()
    manifest = manifest.replace(fidelity={**manifest.fidelity, **report})
    write_manifest(tmp, manifest)
    check_budget(report, gate, f"the {_format_record(plan, parent)['weight_format']} compressed pipeline")
    return manifest


def export_compressed(export: Callable[[Path], Any], out_dir: str | Path, default_format: WeightFormat | str,
                      per_component: Mapping[str, WeightFormat | str] | None = None, *, overwrite: bool = False,
                      gate: Any = None, on_step: Callable[[str], None] = lambda msg: None) -> Manifest:
    """``export`` (called with a folder to write the float ONNX pipeline into) into a scratch
    folder beside ``out_dir``, then :func:`compress_pipeline` into ``out_dir`` (judged against the
    float export by ``gate``, a :class:`GateSpec`, when given); the scratch folder is removed
    either way. The float export is on disk, never in memory, while the weights are compressed."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.float-", dir=out.parent))
    try:
        export(scratch / "onnx")
        mode = default_format if isinstance(default_format, str) else default_format.mode
        on_step(f"compressing the weights ({mode})")
        return compress_pipeline(scratch / "onnx", out, default_format, per_component, overwrite=overwrite,
                                 gate=gate, on_step=on_step)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
