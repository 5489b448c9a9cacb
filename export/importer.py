"""``enginekit import``: a folder another tool wrote, checked, hashed and given a manifest.

optimum-cli's OpenVINO export (``optimum-cli export openvino``, ``OVDiffusionPipeline.save_pretrained``,
``OVModelForImageClassification.save_pretrained``) and optimum's ONNX export write engines enginekit
can run: an SD 1.x/2.x, SDXL, SD3 or FLUX pipeline (``model_index.json``, one folder per component)
or an image classifier (``openvino_model.xml`` or ``model.onnx`` beside ``config.json`` and
``preprocessor_config.json``). :func:`import_folder` recognises the folder through the task
registry (each task's ``import_folder`` stage reads the folders of its task; the pipeline's
family through the family registry, as the export recognises a diffusers folder), reads every
engine's inputs and outputs from the engine itself, and writes the manifest:

- ``import_folder(SRC, OUT)``: a copy of the folder in ``OUT`` (each file hard-linked where
  ``OUT`` is on the same filesystem, else copied; hashed as it is read) with its manifest, written
  atomically;
- ``import_folder(SRC, adopt=True)``: ``SRC/manifest.json`` written in place, nothing else of the
  folder touched.

The vendor's files are never rewritten: where an engine's interface differs from enginekit's
(tensor names, a one-row timestep) the manifest records it per component and the runner
translates (:mod:`enginekit.interface`). What enginekit adds besides the manifest goes under
``enginekit/`` (a tokenizer.json converted from a CLIP tokenizer's vocab.json and merges.txt).
A folder that is not one of these, or lacks a component, or holds a damaged file, is refused in
one line and nothing is written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from enginekit.artifact import SIGNATURE_NAME, atomic_artifact, file_entry
from enginekit.errors import ArtifactError, InputError, SourceError
from enginekit.export.import_engines import Engine
from enginekit.manifest import MANIFEST_NAME, Component, FileEntry, Manifest

__all__ = ["GENERATED", "ComponentPlan", "FolderPlan", "import_folder"]

#: The folder of an imported artifact that holds what enginekit wrote besides the manifest.
GENERATED = "enginekit"
#: The backend that runs each kind of imported engine when none is named.
_TARGETS = {"openvino": {"backend": "openvino", "device": "cpu"}, "onnx": {"backend": "onnxruntime", "device": "cpu"}}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ComponentPlan:
    """One component as a task's reader found it: its engine and the interface the runner adapts."""

    name: str
    engine: Engine
    interface: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FolderPlan:
    """What a task's reader (its ``import_folder`` stage) makes of a folder: everything the
    manifest says but the files' hashes. ``described`` names what was found, for messages."""

    task: str
    family: str
    kind: str
    components: tuple[ComponentPlan, ...]
    task_config: Mapping[str, Any]
    described: str
    provenance: Mapping[str, Any] = field(default_factory=dict)


Reader = Callable[[Path, Path, Callable[[str], Any]], "FolderPlan | None"]


def import_folder(src: str | Path, out: str | Path | None = None, *, adopt: bool = False, overwrite: bool = False,
                  link: bool = True, on_step: Callable[[str], Any] = lambda msg: None) -> Manifest:
    """Import the folder ``src`` (see the module docstring): into ``out`` as a hashed copy
    (``link``: hard links where the filesystem allows), or in place with ``adopt=True``.
    ``overwrite`` replaces an existing ``out`` artifact, or an adopted folder's manifest."""
    src = Path(src)
    if adopt == (out is not None):
        raise InputError("import writes either a copy (-o OUT) or the manifest in place (--adopt): give one")
    if not src.is_dir():
        raise SourceError(f"{src}: no such folder")
    if (src / MANIFEST_NAME).exists() and not (adopt and overwrite):
        raise ArtifactError(f"{src} already has a {MANIFEST_NAME} (an enginekit artifact: load it as it is"
                            + ("; --overwrite imports it again)" if adopt else ")"))
    # Adopting again (--overwrite) leaves out what the last adoption wrote: it is written anew.
    files = _files(src, adopt, skip_generated=adopt and (src / MANIFEST_NAME).exists())
    with tempfile.TemporaryDirectory(prefix="enginekit-import-") as scratch:
        plan = _plan(src, Path(scratch), on_step)
        made = _files(Path(scratch), False)
        if made and any(f.split("/")[0] == GENERATED for f in files):
            raise SourceError(f"{src} has a folder {GENERATED}/ of its own, where enginekit writes its files")
        if adopt:
            return _adopt(src, plan, files, Path(scratch), made, overwrite, on_step)
        with atomic_artifact(out, overwrite=overwrite, inputs=(src,)) as tmp:
            entries: dict[str, FileEntry] = {}
            linked = 0
            for i, rel in enumerate(files, 1):
                on_step(f"[{i}/{len(files)}] {rel}")
                entries[rel], was_linked = _place(src / rel, tmp, rel, link)
                linked += was_linked
            for rel in made:
                entries[f"{GENERATED}/{rel}"], _ = _place(Path(scratch) / rel, tmp, f"{GENERATED}/{rel}", False)
            manifest = _manifest(src, plan, entries, "link" if linked else "copy")
            (tmp / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        return manifest


def _plan(src: Path, scratch: Path, on_step: Callable[[str], Any]) -> FolderPlan:
    """The plan of the first task whose reader claims ``src``, or a one-line refusal saying what it is."""
    from enginekit.registry import stage, task_names, task_stages

    for task in task_names():
        if task_stages(task).import_folder is None:
            continue
        reader: Reader = stage(task, "import_folder")
        plan = reader(src, scratch, on_step)
        if plan is not None:
            return plan
    raise SourceError(f"{src}: {_found(src)}; enginekit imports the folders optimum writes for text-to-image "
                      "pipelines (model_index.json) and image classifiers (config.json of a "
                      "...ForImageClassification model)")


def _found(src: Path) -> str:
    """What the folder holds, in a few words, for a refusal."""
    from enginekit.export.json_files import read_json

    if (src / "config.json").is_file():
        config = read_json(src / "config.json")
        what = config.get("architectures") or config.get("_class_name") or config.get("model_type")
        return f"its config.json is a {what!r} model"
    names = sorted(p.name for p in src.iterdir() if not p.name.startswith("."))[:6]
    return f"no model_index.json or config.json (it holds {', '.join(names) or 'nothing'})"


def _files(root: Path, adopt: bool, skip_generated: bool = False) -> list[str]:
    """Every regular file under ``root`` (a link followed), relative and sorted; hidden entries,
    a previous manifest and signature (and with ``skip_generated`` what enginekit wrote) are left
    out. An adopted folder may not link outside itself (the manifest could not pin what the link
    points at)."""
    out = []
    top = root.resolve()
    seen = {top}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        # Linked folders are followed (a hub snapshot's), each real folder once (no link loops).
        keep = []
        for d in sorted(dirnames):
            real = (Path(dirpath) / d).resolve()
            if d.startswith(".") or real in seen or (skip_generated and Path(dirpath) == root and d == GENERATED):
                continue
            seen.add(real)
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if name.startswith(".") or rel in (MANIFEST_NAME, SIGNATURE_NAME):
                continue
            if adopt and top not in path.resolve().parents:
                raise SourceError(f"{root}: {rel} links outside the folder; import a copy (-o OUT) instead")
            if not path.is_file():
                raise SourceError(f"{root}: {rel} is not a readable file (a dangling link?)")
            out.append(rel)
    return out


def _place(path: Path, root: Path, rel: str, link: bool) -> tuple[FileEntry, bool]:
    """``path`` at ``root/rel``: hard-linked (then hashed) where allowed, else copied while hashed;
    whether it was linked."""
    target = root / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(path.resolve(), target)
            return file_entry(root, rel), True
        except OSError:  # another filesystem, or links not allowed: copy
            pass
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f, open(target, "wb") as g:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
            g.write(block)
            size += len(block)
    return FileEntry(rel, digest.hexdigest(), size), False


def _manifest(src: Path, plan: FolderPlan, entries: Mapping[str, FileEntry], mode: str) -> Manifest:
    from enginekit import __version__
    from enginekit.export.provenance import host

    components = {}
    for comp in plan.components:
        e = comp.engine
        unlisted = [f for f in e.files if f not in entries]
        if unlisted:  # a hidden file, say: never read unhashed
            raise SourceError(f"{src}: {comp.name} reads {unlisted[0]}, which the import does not list")
        components[comp.name] = Component(name=comp.name, entry=e.entry, files=tuple(entries[f] for f in e.files),
                                          inputs=e.inputs, outputs=e.outputs, precision=e.precision,
                                          interface=dict(comp.interface))
    used = {f.path for c in components.values() for f in c.files}
    return Manifest(
        kind=plan.kind, task=plan.task, family=plan.family, components=components, task_config=dict(plan.task_config),
        assets=tuple(e for rel, e in entries.items() if rel not in used),
        provenance={"imported": {"from": str(src.resolve()), "mode": mode, "found": plan.described,
                                 **plan.provenance},
                    "parent": None, "tools": {"enginekit": __version__}, "host": host()},
        target=dict(_TARGETS[plan.kind]),
    )


def _adopt(src: Path, plan: FolderPlan, files: list[str], scratch: Path, made: list[str], overwrite: bool,
           on_step: Callable[[str], Any]) -> Manifest:
    """Hash ``src`` in place, put what the reader made under ``src/enginekit/`` and write the
    manifest last (atomically): an interrupted adoption leaves no manifest, or the old one."""
    entries = {}
    for i, rel in enumerate(files, 1):
        on_step(f"[{i}/{len(files)}] hashing {rel}")
        entries[rel] = file_entry(src, rel)
    generated = src / GENERATED
    if made:
        staged = Path(tempfile.mkdtemp(prefix=f".{GENERATED}.partial-", dir=src))
        try:
            shutil.copytree(scratch, staged, dirs_exist_ok=True)
            for rel in made:
                entries[f"{GENERATED}/{rel}"] = FileEntry(f"{GENERATED}/{rel}", *_hash(staged / rel))
            if generated.exists():
                shutil.rmtree(generated)
            staged.rename(generated)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    manifest = _manifest(src, plan, entries, "adopt")
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST_NAME}.partial-", dir=src)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(manifest.to_json())
        os.chmod(tmp, 0o644 & ~_umask())
        if overwrite:
            os.replace(tmp, src / MANIFEST_NAME)
        else:
            os.link(tmp, src / MANIFEST_NAME)  # fails if another writer put one there meanwhile
    except FileExistsError:
        raise ArtifactError(f"{src}/{MANIFEST_NAME} appeared while importing (another writer?); left as it is") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return manifest


def _hash(path: Path) -> tuple[str, int]:
    from enginekit.artifact import sha256_file

    return sha256_file(path), path.stat().st_size


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
