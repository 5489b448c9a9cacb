"""The image-classification reader of ``enginekit import``: a classifier folder optimum wrote.

``OVModelForImageClassification.save_pretrained`` (optimum-cli ``export openvino --task
image-classification``) writes ``openvino_model.xml``/``.bin`` beside the model's ``config.json``
and its image processor's ``preprocessor_config.json``; optimum's ONNX export writes ``model.onnx``
in their place. The engine takes ``pixel_values`` and gives ``logits`` (no pre-logits embedding:
:meth:`ImageClassifier.embed` says so); the labels come from ``id2label`` and the preprocessing
from the processor's config, translated as the export translates it
(:func:`~enginekit.export.preprocessing.from_transformers_config`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from enginekit.errors import SourceError
from enginekit.export.import_engines import find_engine, name_dims, read_engine, single_interface
from enginekit.export.importer import ComponentPlan, FolderPlan
from enginekit.export.json_files import read_json

__all__ = ["read_classifier_folder"]

TASK = "image-classification"
_SUFFIX = "ForImageClassification"


def read_classifier_folder(src: Path, scratch: Path, on_step: Callable[[str], Any] = lambda msg: None
                           ) -> FolderPlan | None:
    """The plan for the classifier folder ``src``: None unless its config.json names a
    ``...ForImageClassification`` architecture; a missing engine, processor config or labels
    that do not fit the engine are refused in one line."""
    if (src / "model_index.json").is_file() or not (src / "config.json").is_file():
        return None
    config = read_json(src / "config.json")
    archs = [str(a) for a in config.get("architectures") or []]
    arch = next((a for a in archs if a.endswith(_SUFFIX)), None)
    if arch is None:
        return None
    found = find_engine(src, "")
    if found is None:
        raise SourceError(f"{src}: a {arch} folder without its engine (openvino_model.xml or model.onnx)")
    on_step(f"reading {found[0]}")
    engine = read_engine(src, *found)
    interface = single_interface(str(src), "the classifier", engine, "pixel_values", "logits")
    if not (src / "preprocessor_config.json").is_file():
        raise SourceError(f"{src}: no preprocessor_config.json, which enginekit records the preprocessing from "
                          "(optimum-cli export writes it; OVModelForImageClassification.save_pretrained does not: "
                          "save the model's image processor into the folder)")
    from enginekit.export.preprocessing import from_transformers_config

    preprocessing = from_transformers_config(read_json(src / "preprocessor_config.json"))
    logits = interface.get("outputs", {}).get("logits", "logits")
    classes = next(s for s in engine.outputs if s.name == logits).shape[-1]
    labels = _labels(src, config.get("id2label"), classes)
    return FolderPlan(task=TASK, family=str(config.get("model_type") or arch[: -len(_SUFFIX)].lower()),
                      kind=found[1], components=(ComponentPlan("model", name_dims(engine, "classifier", interface),
                                                               interface),),
                      task_config={"preprocessing": preprocessing.to_dict(), "labels": labels},
                      described=f"a {arch} ({found[1]})",
                      provenance={"architecture": arch, "source": config.get("_name_or_path")})


def _labels(src: Path, id2label: Any, classes: int | str) -> list[str] | None:
    """``id2label`` as a list in class order; it must name every class the engine gives."""
    if not id2label:
        return None
    try:
        by_index = {int(k): str(v) for k, v in dict(id2label).items()}
    except (TypeError, ValueError):
        raise SourceError(f"{src}: config.json id2label must map class numbers to names") from None
    labels = [by_index.get(i) for i in range(len(by_index))]
    if None in labels or (isinstance(classes, int) and len(labels) != classes):
        raise SourceError(f"{src}: config.json id2label names {len(by_index)} classes, the engine gives {classes}")
    return labels  # type: ignore[return-value]
