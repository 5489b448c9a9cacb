"""diffusers' PyTorch pipeline of an exported artifact's own weights: the reference that
quantization's image gate and the pipeline bench compare engines with."""

from __future__ import annotations

from typing import Any

from enginekit.errors import SourceError
from enginekit.manifest import Manifest

__all__ = ["reference_pipeline"]


def reference_pipeline(manifest: Manifest) -> Any:
    """diffusers' pipeline of the artifact's weights, from its provenance; changed local weights are an error."""
    from enginekit.export.diffusion.sources import resolve_pipeline

    prov = manifest.provenance
    spec = prov.get("source")
    if not spec:
        raise SourceError("the artifact's manifest records no source pipeline (provenance.source)")
    seeded = prov.get("kind") in ("builtin", "random")
    src = resolve_pipeline(str(spec), random_weights=prov.get("kind") == "random",
                           seed=int(prov.get("seed") or 0), family=prov.get("family") if not seeded else None,
                           revision=prov.get("revision") if prov.get("kind") == "hub" else None,
                           without_t5=bool(prov.get("without_t5")))
    recorded, now = prov.get("weights_sha256"), src.provenance.get("weights_sha256")
    if recorded and now is not None and now != recorded:
        raise SourceError(f"{spec}: the weights changed since the artifact was exported "
                          "(their sha256 differs from the manifest's); re-export it to bench against them")
    return src.pipeline
