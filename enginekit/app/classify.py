"""``predict`` as one library call: classify image files with an artifact, keeping going
past unreadable files when asked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ClassifyOptions", "Classified", "classify_files"]


@dataclass(frozen=True)
class ClassifyOptions:
    top_k: int = 5
    device: str = "auto"
    backend: str | None = None
    batch_size: int = 8
    #: Skip files that are not readable images (reported) instead of stopping at the first.
    skip_bad: bool = False
    digest: str | None = None
    verify_with: str | Path | None = None
    #: Write each image's explanation overlay here as ``<name>_explain.png`` (None: no explanations).
    explain_dir: str | Path | None = None
    #: ``rollout`` (attention, ViTs) or ``occlusion`` (any classifier).
    explain_method: str = "rollout"


@dataclass(frozen=True)
class Classified:
    """What ``predict`` found: (path, prediction, error) per file in order, and where it ran;
    with explanations, the overlay written for each image."""

    results: list[tuple[Path, Any, str | None]]
    engine: str
    overlays: dict[Path, Path] = field(default_factory=dict)

    @property
    def bad(self) -> list[tuple[Path, str]]:
        return [(p, err) for p, _, err in self.results if err is not None]


def classify_files(artifact: str | Path, images: Sequence[str | Path], options: ClassifyOptions = ClassifyOptions(),
                   ) -> Classified:
    """Classify ``images`` (files or folders) with ``artifact``; a task without ``predict``
    (a pipeline) is a one-line :class:`InputError` before anything loads. With
    ``options.explain_dir``, each image's explanation overlay is written there too."""
    import enginekit
    from enginekit.errors import ImageError, InputError
    from enginekit.manifest import read_manifest
    from enginekit.registry import task_class
    from enginekit.runtimes.images import expand_image_paths, load_images

    paths = expand_image_paths(images)
    task = read_manifest(artifact).task
    if not hasattr(task_class(task), "predict"):
        raise InputError(f"{artifact} is a {task} artifact; predict classifies images "
                         "(for a pipeline: enginekit generate ART PROMPT -o OUT.png)")
    results: list[tuple[Path, Any, str | None]] = []
    overlays: dict[Path, Path] = {}
    size = options.batch_size
    with enginekit.load(artifact, device=options.device, backend=options.backend, batch_size=size,
                        digest=options.digest, verify_with=options.verify_with) as clf:
        if not options.skip_bad and options.explain_dir is None:
            results = [(p, pred, None) for p, pred in zip(paths, clf.predict(paths, top_k=options.top_k))]
        for start in range(0, len(paths), size) if options.skip_bad or options.explain_dir is not None else ():
            good: list[tuple[Path, Any]] = []
            for path in paths[start : start + size]:
                try:
                    good.append((path, load_images([path])[0]))
                except ImageError as exc:
                    if not options.skip_bad:
                        raise
                    results.append((path, None, str(exc)))
            images = [image for _, image in good]
            if not good:
                preds = []
            elif options.explain_dir is None:
                preds = clf.predict(images, top_k=options.top_k)
            else:
                preds = _explain(clf, good, options, overlays)
            results.extend((path, pred, None) for (path, _), pred in zip(good, preds))
        engine = f"{clf.backend}:{clf.device}"
    order = {p: i for i, p in enumerate(paths)}
    results.sort(key=lambda r: order[r[0]])
    found = Classified(results, engine, overlays)
    if found.bad and len(found.bad) == len(results):
        raise InputError(f"none of the {len(results)} image(s) could be read; first: {found.bad[0][1]}")
    return found


def _explain(clf: Any, good: list[tuple[Path, Any]], options: ClassifyOptions, overlays: dict[Path, Path]) -> list[Any]:
    """Explain one batch, write each overlay as ``<name>_explain.png`` (``-2``, ``-3`` ... after a
    name already written in this run); the predictions, in order."""
    out_dir = Path(options.explain_dir)  # type: ignore[arg-type]
    out_dir.mkdir(parents=True, exist_ok=True)
    found = clf.explain([image for _, image in good], options.explain_method, top_k=options.top_k)
    taken = {p.name for p in overlays.values()}
    for (path, image), explanation in zip(good, found):
        name, n = f"{path.stem}_explain.png", 1
        while name in taken:
            n += 1
            name = f"{path.stem}_explain-{n}.png"
        taken.add(name)
        target = out_dir / name
        explanation.overlay(image).save(target)
        overlays[path] = target
    return [e.prediction for e in found]
