"""``compile`` and ``generate`` as library calls the CLI makes: each one function."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from enginekit.api import compile_artifact, load
from enginekit.engine import CompileOptions
from enginekit.errors import InputError
from enginekit.manifest import Manifest, read_manifest
from enginekit.registry import task_class

__all__ = ["build_engine", "generate_images", "output_paths"]


def build_engine(
    artifact: str | Path,
    backend: str,
    out: str | Path,
    *,
    device: str = "cpu",
    threads: int = 0,
    precision: str = "fp32",
    height: int | None = None,
    width: int | None = None,
    batch: int | None = None,
    options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Compile ``artifact`` for ``backend`` with the task's defaults: the family's precision
    exceptions and, given a size or batch, static shapes; ``options`` (backend option ->
    value) override them."""
    manifest = read_manifest(artifact)
    cls = task_class(manifest.task)
    extra = dict(cls.compile_options(manifest, backend, precision, height, width, batch))
    extra.update(options or {})
    return compile_artifact(artifact, backend, out, CompileOptions(device=device, threads=threads, extra=extra),
                            overwrite=overwrite)


def output_paths(out: str | Path, count: int) -> list[Path]:
    """``out`` for one image; ``stem-1.png``, ``stem-2.png``, ... beside it for several."""
    out = Path(out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise InputError(f"{out}: the output must end in .png, .jpg or .webp")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, count + 1)]


def generate_images(
    artifact: str | Path,
    prompts: Sequence[str] | str,
    out: str | Path,
    *,
    device: str = "auto",
    backend: str | None = None,
    overwrite: bool = True,
    digest: str | None = None,
    verify_with: str | Path | None = None,
    init_image: str | Path | None = None,
    on_step: Callable[[int, float, Any], Any] | None = None,
    **call: Any,
) -> tuple[list[Path], Any]:
    """Run the text-to-image artifact and write its images to ``out`` (see :func:`output_paths`).

    Each file is written to a temporary name beside it and renamed into place, so an
    interrupted or failed run leaves no half-written image. Returns the paths and the
    pipeline's output (seed and timesteps). ``digest`` / ``verify_with`` pin the artifact
    as :func:`enginekit.load` does, in the same load that runs it."""
    count = (1 if isinstance(prompts, str) else len(prompts)) * int(call.get("num_images_per_prompt", 1))
    paths = output_paths(out, count)
    if not overwrite:
        taken = [p for p in paths if p.exists()]
        if taken:
            raise InputError(f"{taken[0]} already exists; choose another output or pass --overwrite")
    with load(artifact, device=device, backend=backend, digest=digest, verify_with=verify_with) as pipe:
        if getattr(pipe, "task", None) != "text-to-image":
            raise InputError(f"{artifact} is a {pipe.task} artifact; generate needs a text-to-image pipeline")
        result = pipe(prompts, image=init_image, callback=on_step, output_type="pil", **call)
    for path, image in zip(paths, result.images):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                image.save(f, format={".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG"))
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return paths, result
