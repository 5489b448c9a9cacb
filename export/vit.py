"""Export a ViT image classifier (timm or transformers) to an ONNX artifact.

The exported graph takes ``pixel_values`` (N, 3, H, W) float32 with a dynamic
batch axis and returns ``logits`` (N, classes) and ``embedding`` (N, D), the
pre-logits features. Every export ends with a parity check of ONNX Runtime
against PyTorch on the same inputs; a miss raises :class:`FidelityError`. A ViT's
export also records how its tokens lie on the image (``extra["attention"]``) and
checks the attention probabilities the engine computes, and their rollout,
against PyTorch's (:mod:`enginekit.export.attention`): what explanations read.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from enginekit.artifact import atomic_artifact, make_component, write_manifest
from enginekit.errors import ExportError, FidelityError, one_line
from enginekit.export.attention import attention_layout, check_rollout
from enginekit.export.sources import SourceModel, resolve_source
from enginekit.fidelity import compare_outputs
from enginekit.export.provenance import check_export_request, host, tool_versions
from enginekit.manifest import Manifest, TensorSpec
from enginekit.runtimes.onnxruntime import run_onnx_file

__all__ = ["ExportOptions", "export_classifier"]

INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("logits", "embedding")
#: Past this many bytes of weights, protobuf's 2 GB limit needs external data.
_EXTERNAL_DATA_BYTES = 1_800_000_000


@dataclass(frozen=True)
class ExportOptions:
    opset: int = 18
    #: Parity budget against PyTorch: max |onnx - torch| <= atol + rtol * max |torch|.
    atol: float = 1e-4
    rtol: float = 1e-4
    #: Samples in the parity batch (a batch size other than the traced one, to exercise the dynamic axis).
    parity_batch: int = 3
    seed: int = 0
    #: Token merging: pairs of tokens each ViT block merges (0: none); see :mod:`enginekit.export.token_merge`.
    token_merge: int = 0

    def __post_init__(self) -> None:
        check_export_request(self.opset, self.atol, self.rtol)
        if self.token_merge < 0:
            raise ExportError(f"token merging takes a number of token pairs per block (>= 0), got {self.token_merge}")


def _wrapper_class() -> type:
    import torch

    class ClassifierWithEmbedding(torch.nn.Module):
        """Return (logits, pre-logits embedding) from a timm or transformers ViT."""

        def __init__(self, model: Any, library: str) -> None:
            super().__init__()
            self.model = model
            self.library = library

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if self.library == "timm":
                feats = self.model.forward_features(pixel_values)
                emb = self.model.forward_head(feats, pre_logits=True)
                return self.model.get_classifier()(emb), emb
            # transformers ViTForImageClassification: classifier over the [CLS] token
            hidden = self.model.vit(pixel_values).last_hidden_state
            emb = hidden[:, 0, :]
            return self.model.classifier(emb), emb

    return ClassifierWithEmbedding


def _reference_logits(src: SourceModel, x: Any) -> Any:
    out = src.model(x)
    return out if src.library == "timm" else out.logits


def export_classifier(
    spec: str | SourceModel,
    out_dir: str | Path,
    options: ExportOptions = ExportOptions(),
    *,
    random_weights: bool = False,
    weights: str | Path | None = None,
    revision: str | None = None,
    overwrite: bool = False,
    on_step: Callable[[str], None] = lambda msg: None,
) -> Manifest:
    """Export ``spec`` (a source spec string or a loaded :class:`SourceModel`) to ``out_dir``."""
    import torch

    on_step("loading the PyTorch model")
    src = spec if isinstance(spec, SourceModel) else resolve_source(
        spec, random_weights=random_weights, seed=options.seed, weights=weights, revision=revision
    )
    unmerged = None
    if options.token_merge:
        unmerged = _wrapper_class()(src.model, src.library).eval()
        src = _with_token_merge(src, options.token_merge)
    wrapper = _wrapper_class()(src.model, src.library).eval()
    height, width = src.preprocessing.size
    gen = torch.Generator().manual_seed(options.seed)
    example = torch.randn(2, 3, height, width, generator=gen)
    parity_x = torch.randn(options.parity_batch, 3, height, width, generator=gen)
    with torch.inference_mode():
        ref_logits, ref_emb = wrapper(parity_x)
        direct = _reference_logits(src, parity_x)
    # The wrapper must be the model: its logits equal the model's own forward.
    if not torch.allclose(ref_logits, direct, atol=1e-5, rtol=1e-5):
        raise ExportError(f"cannot export {src.architecture} ({src.family} family): its logits are not "
                          "forward_head(pre_logits=True) followed by its classifier, which enginekit's export assumes")

    n_bytes = sum(p.numel() * p.element_size() for p in src.model.parameters())
    with atomic_artifact(out_dir, overwrite=overwrite, inputs=(spec,) if isinstance(spec, str) else ()) as tmp:
        on_step(f"exporting {src.architecture} to ONNX (opset {options.opset})")
        onnx_path = tmp / "model.onnx"
        external = n_bytes > _EXTERNAL_DATA_BYTES
        _torch_export(wrapper, example, onnx_path, options.opset, external)

        on_step("checking ONNX Runtime against PyTorch")
        got = run_onnx_file(onnx_path, {INPUT_NAME: parity_x.numpy()})
        report = compare_outputs({"logits": ref_logits.numpy(), "embedding": ref_emb.numpy()}, got)
        budget = options.atol + options.rtol * float(np.abs(ref_logits.numpy()).max())
        fidelity = {
            "reference": "pytorch",
            "samples": options.parity_batch,
            "inputs": "seeded normal noise",
            "budget_max_abs": budget,
            **report,
        }
        if unmerged is not None:
            with torch.inference_mode():
                plain_logits, plain_emb = unmerged(parity_x)
            # What merging changed, on the same noise: a record, not a gate (held-out data gates it).
            fidelity["unmerged_model"] = compare_outputs({"logits": plain_logits.numpy(),
                                                          "embedding": plain_emb.numpy()}, got)
        if report["logits_max_abs"] > budget or report["embedding_max_abs"] > budget * 10:
            raise FidelityError(
                f"ONNX export of {src.architecture} misses its parity budget: logits max abs "
                f"{report['logits_max_abs']:.3g} (budget {budget:.3g}), cosine {report['logits_cosine']:.6f}, "
                f"embedding max abs {report['embedding_max_abs']:.3g}"
            )
        layout = attention_layout(src, (height, width))
        if layout is not None:
            on_step("checking the engine's attention rollout against PyTorch's")
            fidelity.update(check_rollout(src, onnx_path, parity_x, layout))
        files = ["model.onnx"] + (["model.onnx.data"] if external else [])
        num_classes = int(ref_logits.shape[1])
        dim = int(ref_emb.shape[1])
        component = make_component(
            tmp,
            "model",
            "model.onnx",
            files,
            [TensorSpec(INPUT_NAME, "float32", ("batch", 3, height, width))],
            [TensorSpec("logits", "float32", ("batch", num_classes)), TensorSpec("embedding", "float32", ("batch", dim))],
        )
        manifest = Manifest(
            kind="onnx",
            task="image-classification",
            family=src.family,
            components={"model": component},
            task_config={"preprocessing": src.preprocessing.to_dict(),
                         "labels": list(src.labels) if src.labels is not None else None},
            provenance={**src.provenance, "architecture": src.architecture, "parent": None,
                        "tools": tool_versions(options.opset, ("timm", "transformers"), [onnx_path]), "host": host()},
            target={"backend": "onnxruntime", "device": "cpu"},
            fidelity=fidelity,
            extra={"num_classes": num_classes, "embedding_dim": dim, "parameters": sum(p.numel() for p in src.model.parameters()),
                   **({"attention": layout} if layout is not None else {})},
        )
        write_manifest(tmp, manifest)
    return manifest


def _with_token_merge(src: SourceModel, r: int) -> SourceModel:
    """``src`` with ToMe's merging in every block; the manifest records it (an approximation of the model)."""
    from dataclasses import replace

    from enginekit.export.token_merge import is_vit, merge_plan, token_merged

    if not is_vit(src.model, src.library):
        raise ExportError(f"token merging is built for ViTs; {src.architecture} is a {src.family} model")
    model = token_merged(src.model, src.library, r).eval()
    merge = merge_plan(src.model, src.library, src.preprocessing.size, r)
    # The merged module speaks timm's forward_features/forward_head for either library.
    return replace(src, model=model, library="timm", provenance={**src.provenance, "token_merge": merge})


@contextlib.contextmanager
def _no_all_true_attention_mask() -> Any:
    """transformers (>= 5) leaves out the attention mask of an unpadded bidirectional model (ViT) when it
    runs, but builds it while ``torch.export`` traces, where it cannot look at a mask's values: an
    all-True constant mask, which the exporter lowers to ``Where`` + ``Softmax`` + ``IsNaN`` guards that
    keep OpenVINO from fusing the attention. With no padding mask given there is nothing to look at:
    skip it while tracing too (the same graph PyTorch runs)."""
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    original = getattr(masking_utils, "_ignore_bidirectional_mask_sdpa", None)
    if original is None:
        yield
        return

    def ignore(padding_mask: Any, kv_length: int, local_attention_size: int | None = None) -> bool:
        if padding_mask is None and local_attention_size is None:
            return True
        return original(padding_mask, kv_length, local_attention_size)

    masking_utils._ignore_bidirectional_mask_sdpa = ignore
    try:
        yield
    finally:
        masking_utils._ignore_bidirectional_mask_sdpa = original


def _torch_export(wrapper: Any, example: Any, path: Path, opset: int, external: bool) -> None:
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    sink = io.StringIO()
    try:
        # The exporter prints progress lines of its own; keep them out of our output.
        with contextlib.redirect_stdout(sink), _no_all_true_attention_mask():
            torch.onnx.export(
                wrapper,
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=({0: batch},),
                external_data=external,
                verbose=False,
            )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed: {one_line(exc)}") from exc
    if external:
        # One data file beside model.onnx, whatever name the exporter chose.
        import onnx

        model = onnx.load(str(path), load_external_data=True)
        for stale in path.parent.glob("*.data"):
            stale.unlink()
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
