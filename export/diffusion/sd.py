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

import gc
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from enginekit.artifact import atomic_artifact, make_assets, make_component, write_manifest
from enginekit.errors import ExportError, FidelityError, SourceError, one_line
from enginekit.export.diffusion.deepcache import drop_cache_output
from enginekit.export.diffusion.families import check_family, get_family
from enginekit.export.json_files import jsonable
from enginekit.export.diffusion.lora import LoraSpec, fuse_loras
from enginekit.export.diffusion.lora_map import LORA_COMPONENTS, component_map, write_map
from enginekit.runtimes.lora_map import MAP_FILE
from enginekit.export.diffusion.onnx_export import DATA_FILE as _DATA_FILE, _one_data_file, _torch_export  # noqa: F401
from enginekit.export.diffusion.plans import TEXT_ENCODERS, _is_t5, _Plan, _plans
from enginekit.export.diffusion.sources import PipelineSource, resolve_pipeline
from enginekit.export.diffusion.wrappers import _wrappers
from enginekit.fidelity import compare_outputs
from enginekit.export.provenance import check_export_request, host, tool_versions
from enginekit.manifest import Component, Manifest
from enginekit.memory import PeakRSS
from enginekit.runtimes.onnxruntime import run_onnx_file

# _Plan, _plans and _wrappers are imported from here by the measurement scripts and tests.
__all__ = ["PipelineExportOptions", "export_pipeline", "_Plan", "_plans", "_wrappers"]

#: Past this many bytes of weights, protobuf's 2 GB limit needs external data.
_EXTERNAL_DATA_BYTES = 1_800_000_000
_TEXT_OUTPUTS = ("last_hidden_state", "penultimate_hidden_state", "pooled")


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
    #: ControlNets (diffusers folders or single .safetensors files) exported as components beside the UNet.
    controlnets: tuple[str, ...] = ()
    #: Trace each component with fake weights and stream its weights, tensor by tensor, from the
    #: source's safetensors (or the per-tensor seeded generator) into its data file: the model is
    #: never whole in memory. The PyTorch reference is never built either, so the whole-image check
    #: does not run (the manifest says so); each component is checked block by block (``block_check``).
    streaming: bool = False
    #: The weights' format (a :class:`~enginekit.export.compress.WeightFormat` or its mode: fp32,
    #: fp16, int8, int4) for the denoiser; the other components take their family's defaults
    #: (:meth:`DiffusionFamily.weight_formats`) and ``component_formats`` ({"text_encoder_2":
    #: "int4"}) overrides them. Streaming compresses each tensor as it is streamed; otherwise the
    #: float export is written to a scratch folder and compressed from there.
    weight_format: Any = None
    component_formats: Mapping[str, Any] | None = None
    #: A streamed component is checked against PyTorch block by block, one block's weights in memory
    #: at a time (export/diffusion/block_parity.py); off leaves it unchecked.
    block_check: bool = True

    def __post_init__(self) -> None:
        check_export_request(self.opset, self.atol, self.rtol)


# --------------------------------------------------------------------------- export


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
    if _compressing(options) and not options.streaming:
        # The float export on disk, then compressed from it and judged against it (the image gate).
        from enginekit.export.diffusion.compress import export_compressed
        from enginekit.quant.diffusion_gate import GateSpec

        float_options = replace(options, weight_format=None, component_formats=None)
        return export_compressed(
            lambda folder: export_pipeline(spec_or_source, folder, float_options, family=family,
                                           random_weights=random_weights, revision=revision, on_step=on_step),
            out_dir, options.weight_format, options.component_formats, overwrite=overwrite,
            gate=GateSpec() if options.image_check else None, on_step=on_step)
    with PeakRSS(sample_s=0.1) as rss:
        started = time.monotonic()
        owned = not isinstance(spec_or_source, PipelineSource)
        src = _source(spec_or_source, options, family=family, random_weights=random_weights, revision=revision,
                      on_step=on_step)
        pipe = src.pipeline
        streamed = src.weights is not None
        if streamed and options.loras:
            raise ExportError("LoRA files are fused into loaded weights: export without streaming to fuse them")
        if options.loras:
            on_step(f"fusing {len(options.loras)} LoRA file(s) into the weights")
            src.provenance["lora"] = fuse_loras(pipe, src.family, options.loras)
            rss.sample()
        if options.controlnets:
            if streamed:
                raise ExportError("ControlNets load with their weights: export them without streaming")
            from enginekit.export.diffusion.controlnet import attach_controlnets, controlnet_section

            on_step(f"loading {len(options.controlnets)} ControlNet(s)")
            pipe, src.provenance["controlnets"] = attach_controlnets(pipe, src.family, options.controlnets)
        task_config = get_family(src.family).task_config(pipe)
        task_config.update(controlnet_section(pipe) if options.controlnets else {})
        # Read before any component is dropped: setting one to None rewrites the pipeline's config.
        model_index = _model_index(pipe)
        configs = _component_configs(pipe)
        formats = None
        if streamed and _compressing(options):
            from enginekit.export.diffusion.compress import pipeline_formats

            formats = pipeline_formats(pipe, src.family, options.weight_format, options.component_formats)
        with atomic_artifact(out_dir, overwrite=overwrite,
                             inputs=(spec_or_source,) if owned else ()) as tmp:
            components, fidelity, exporters = _export_components(tmp, pipe, src.family, options, owned, rss, on_step,
                                                                 src.weights, formats)
            on_step("writing tokenizers, scheduler and model index")
            assets = _write_assets(tmp, pipe, task_config, model_index, configs)
            assets += [MAP_FILE] if (tmp / MAP_FILE).is_file() else []
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
                            **({"streamed": True} if streamed else {}),
                            "export_seconds": round(time.monotonic() - started, 1)},
                target={"backend": "onnxruntime", "device": "cpu"},
                fidelity={"reference": "pytorch", "runtime": "onnxruntime-cpu", "components": fidelity},
            )
            if streamed:
                manifest = manifest.replace(fidelity={**manifest.fidelity, "image": _NOT_CHECKED})
            if formats is not None:
                from enginekit.export.diffusion.compress import streamed_record

                manifest = manifest.replace(quantization=streamed_record(formats, components, src.family))
            write_manifest(tmp, manifest)
            if options.image_check and not streamed:
                manifest = _check_image(pipe, tmp, manifest, options, on_step)
                rss.sample()
                manifest = manifest.replace(provenance={**manifest.provenance, "peak_rss_bytes": rss.peak})
                write_manifest(tmp, manifest)
        if owned:
            del src, pipe
            gc.collect()
    return manifest


def _source(spec_or_source: str | PipelineSource, options: PipelineExportOptions, *, family: str | None,
            random_weights: bool, revision: str | None, on_step: Callable[[str], None]) -> PipelineSource:
    """The PyTorch pipeline: resolved from a spec, or a loaded source checked against ``family``."""
    if not isinstance(spec_or_source, PipelineSource):
        on_step("loading the PyTorch pipeline")
        return resolve_pipeline(str(spec_or_source), family=family, random_weights=random_weights,
                                seed=options.seed, revision=revision, without_t5=options.without_t5,
                                empty_weights=options.streaming)
    try:
        check_family("the source", spec_or_source.family, family)
    except SourceError as exc:
        raise ExportError(str(exc)) from None
    if options.streaming and spec_or_source.weights is None:
        raise ExportError("streaming needs a source built with empty weights "
                          "(resolve_pipeline(..., empty_weights=True)); this one holds its weights")
    return spec_or_source


def _compressing(options: PipelineExportOptions) -> bool:
    """Whether ``options`` ask for any weights other than fp32."""
    fmt = options.weight_format
    mode = getattr(fmt, "mode", fmt)
    return (mode is not None and mode != "fp32") or bool(options.component_formats)


def _export_components(tmp: Path, pipe: Any, family: str, options: PipelineExportOptions, owned: bool,
                       rss: PeakRSS, on_step: Callable[[str], None], weights: dict[str, Any] | None = None,
                       formats: Mapping[str, Any] | None = None,
                       ) -> tuple[dict[str, Component], dict[str, Any], dict[str, str]]:
    """Export and parity-check every component into ``tmp``, one at a time; an owned pipeline
    without the image check drops each component's weights as soon as it is exported.
    ``weights`` (a streaming source's) streams them instead (checked block by block), each component in its
    format from ``formats`` (None: fp32)."""
    exporters: dict[str, str] = {}
    components: dict[str, Component] = {}
    lora_maps: dict[str, Any] = {}
    fidelity: dict[str, Any] = {}
    plans = _plans(pipe, family, options)
    for i, make in enumerate(plans, 1):
        plan = make()
        on_step(f"[{i}/{len(plans)}] {plan.name}: exporting to ONNX (opset {options.opset})")
        droppable = owned and not options.image_check and plan.name in (*TEXT_ENCODERS, "unet", "transformer")

        def release(plan: _Plan = plan) -> None:
            # The last references: the weights go now, before ONNX Runtime loads the graph
            # for the parity check, so a 10 GB transformer is never in memory twice.
            plan.module = None
            setattr(pipe, plan.name, None)
            gc.collect()

        if weights is not None:
            fmt = formats.get(plan.name) if formats else None
            comp, report, exporter = _export_streamed(tmp, plan, options, on_step, i, len(plans), pipe, weights, fmt)
        else:
            mapped = getattr(pipe, plan.name, None) if plan.name in LORA_COMPONENTS else None
            comp, report, exporter = _export_component(tmp, plan, options, on_step, i, len(plans),
                                                       release if droppable else None, mapped, lora_maps)
        components[plan.name] = comp
        fidelity[plan.name] = {k: report[k] for k in ("min_cosine", "max_abs", "passed")}
        if weights is not None:
            fidelity[plan.name].update(streamed=True, checked=report["checked"], method=report.get("method"))
        exporters[plan.name] = exporter
        del plan, make, release
        gc.collect()
        rss.sample()
    write_map(tmp, lora_maps)  # where each LoRA-able weight landed (runtimes/lora_map.py)
    return components, fidelity, exporters


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
    release: Callable[[], None] | None = None, mapped: Any = None, lora_maps: dict[str, Any] | None = None,
) -> tuple[Component, dict[str, Any], str]:
    """Export one component and check it on ONNX Runtime against PyTorch's outputs (computed
    first); ``release``, when given, drops the PyTorch module between the two. ``mapped`` (the
    diffusers component) has its weights found in the graph for LoRA at run time, into ``lora_maps``."""
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
    if mapped is not None and lora_maps is not None:
        lora_maps[plan.name] = component_map(mapped, path)
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


#: The fidelity record of what a streamed export cannot check: its PyTorch reference is never in memory.
_NOT_CHECKED = {"checked": False, "passed": None,
                "why": "streamed export: the PyTorch model is never whole in memory, so it is not run"}


def _export_streamed(root: Path, plan: _Plan, opts: PipelineExportOptions, on_step: Callable[[str], None], i: int,
                     n: int, pipe: Any, weights: dict[str, Any], fmt: Any = None,
                     ) -> tuple[Component, dict[str, Any], str]:
    """Export one component traced with fake weights, streaming its weights into its data file
    (int8/int4 ``fmt``: compressed on the way; fp16: converted once written)."""
    from enginekit.export.compress import check_fp16_fits, compress_component, written_files
    from enginekit.export.diffusion.streaming import DATA_FILE, export_streamed

    folder = root / plan.name
    path = folder / "model.onnx"
    mode = getattr(fmt, "mode", "fp32")
    if mode == "fp16":  # converted in memory once written: refused before the export if it cannot fit
        check_fp16_fits(plan.name, sum(p.numel() * 4 for p in plan.module.parameters()))
    folder.mkdir()
    on_step(f"[{i}/{n}] {plan.name}: tracing, then streaming the weights into {DATA_FILE}"
            + (f" ({mode})" if mode != "fp32" else ""))
    if drop_cache_output(plan):  # torch.export cannot give out that intermediate, and no TorchScript here
        on_step(f"[{i}/{n}] {plan.name}: streamed without the deep_cache output (DeepCache is off for it)")
    record = export_streamed(plan, path, opts.opset, pipe, weights, fmt)
    quantization = record.pop("compression", None)
    if mode == "fp16":
        on_step(f"[{i}/{n}] {plan.name}: converting to fp16")
        half = root / f".{plan.name}.fp16"
        quantization = compress_component(folder, fmt, half)
        shutil.rmtree(folder)
        half.rename(folder)
    _name_dims(path, plan)
    report = {**_NOT_CHECKED, "min_cosine": None, "max_abs": None, "exporter": "dynamo", **record}
    if opts.block_check:
        from enginekit.export.diffusion.block_parity import BUDGETS, BlockBudget, check_blocks

        on_step(f"[{i}/{n}] {plan.name}: checking ONNX Runtime against PyTorch, one block in memory at a time")
        fp32 = BlockBudget(atol=opts.atol, rtol=opts.rtol, output_min_cosine=opts.min_cosine)
        report = {**check_blocks(plan, path, pipe, weights, budgets={**BUDGETS, "fp32": fp32}),
                  "exporter": "dynamo", **record}
    files = [f"{plan.name}/{f}" for f in written_files(folder)]
    comp = make_component(root, plan.name, f"{plan.name}/model.onnx", files, plan.inputs, plan.outputs, mode,
                          fidelity=report, quantization=quantization if mode != "fp32" else None)
    return comp, report, "dynamo"


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
    index.update({k: v for k, v in jsonable(dict(pipe.config)).items() if not k.startswith("_")})
    return index


def _component_configs(pipe: Any) -> dict[str, dict[str, Any]]:
    """Each model component's own config (diffusers' or transformers'), as its ``config.json``
    in a ``save_pretrained`` folder holds it: what a folder layout other tools read needs
    (OpenVINO GenAI's, optimum-intel's)."""
    out = {}
    for name, value in pipe.components.items():
        config = getattr(value, "config", None)
        if config is None or name == "scheduler" or not hasattr(value, "parameters"):
            continue
        data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        out[name] = jsonable({k: v for k, v in data.items() if k != "_name_or_path"})
    return out


def _write_assets(root: Path, pipe: Any, task_config: dict[str, Any], model_index: dict[str, Any],
                  configs: dict[str, dict[str, Any]]) -> list[str]:
    from enginekit.export.diffusion.tokenizer import save_tokenizer

    rels: list[str] = []
    for name, config in configs.items():  # <component>/config.json, as save_pretrained writes it
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                                 encoding="utf-8")
        rels.append(f"{name}/config.json")
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

