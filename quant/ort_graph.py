"""The plumbing every ONNX Runtime method shares: loading and saving ONNX models
(external data past 2 GB), picking the weighted nodes, muting the quantizers and
turning their failures into one-line errors, and a scratch folder beside the result.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from enginekit.errors import QuantizationError
from enginekit.quant.base import QuantJob

ENTRY = "model.onnx"
DATA = "model.onnx.data"
#: Past this many bytes a model is saved with its tensors in ``model.onnx.data`` (protobuf stops at 2 GB).
EXTERNAL_DATA_BYTES = 1_800_000_000
#: Weighted op types: what the int8 methods quantize.
WEIGHTED_OPS = ("MatMul", "Gemm", "Conv")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Mute the quantizers' chatter: root-logger warnings ("consider pre-processing"),
    Python warnings and the histogram collector's ``print`` calls. Errors still raise."""
    root = logging.getLogger()
    # logging.warning() on a root logger without handlers installs one for the
    # whole process (basicConfig); a temporary NullHandler prevents that.
    guard = logging.NullHandler() if not root.handlers else None
    if guard:
        root.addHandler(guard)
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)
        if guard:
            root.removeHandler(guard)


@contextlib.contextmanager
def ort_errors(what: str) -> Iterator[None]:
    """Re-raise a quantizer failure as a one-line QuantizationError."""
    try:
        yield
    except QuantizationError:
        raise
    except Exception as exc:  # the quantizers raise bare Exception, AssertionError, onnx errors...
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        detail = lines[0] if lines else type(exc).__name__
        raise QuantizationError(f"{what} failed: {detail}") from exc


@contextlib.contextmanager
def scratch_dir(job: QuantJob) -> Iterator[Path]:
    """A scratch folder inside ``job.out_dir`` (same disk as the result), always removed."""
    job.out_dir.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=".scratch-", dir=job.out_dir))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def private_input(model: Path, scratch: Path) -> Path:
    """``model`` as seen from a folder of this job's own: ONNX Runtime's quantizers write
    ``<model>-inferred.onnx`` beside the model they are given and delete it, so two jobs on one
    model (a test run on several workers, two users of one export) would remove each other's.
    The link and its external data's links live in ``scratch``."""
    from enginekit.onnx_wire import external_locations

    folder = scratch / "input"
    folder.mkdir(exist_ok=True)
    for rel in [model.name, *external_locations(model)]:
        link = folder / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to((model.parent / rel).resolve())
    return folder / model.name


def model_bytes(model: Path) -> int:
    """Size of a model file with its external data (the files beside it that it names)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    proto = onnx.load(str(model), load_external_data=False)
    locations = set()
    for init in proto.graph.initializer:
        if uses_external_data(init):
            locations.update(e.value for e in init.external_data if e.key == "location")
    return model.stat().st_size + sum((model.parent / loc).stat().st_size for loc in locations)


def over_size_limit(model: Any) -> bool:
    """Whether a ModelProto in memory is past what one protobuf file holds."""
    try:
        return model.ByteSize() > EXTERNAL_DATA_BYTES
    except Exception:  # protobuf will not even size a message past 2 GB ("Failed to serialize proto")
        return True


def is_large(job: QuantJob) -> bool:
    """Whether the model on disk (with its external data) is past what one protobuf file holds."""
    return model_bytes(job.model) > EXTERNAL_DATA_BYTES


def load_model(job: QuantJob) -> Any:
    import onnx

    if not job.model.is_file():
        raise QuantizationError(f"{job.model}: no such ONNX model")
    with ort_errors(f"onnx.load of {job.model}"):
        return onnx.load(str(job.model))


def graph_nodes(model: Any) -> dict[str, Any]:
    return {n.name: n for n in model.graph.node}


def check_excluded(model: Any, job: QuantJob) -> list[str]:
    """``exclude_nodes`` must name nodes of the float graph: a typo would otherwise exclude nothing."""
    names = graph_nodes(model)
    unknown = [n for n in job.options.exclude_nodes if n not in names]
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:3]) + (" ..." if len(unknown) > 3 else "")
        raise QuantizationError(
            f"exclude_nodes names no node of {job.model.name}: {shown}; give node names of the float ONNX graph"
        )
    return list(job.options.exclude_nodes)


def weighted_nodes(model: Any, exclude: Sequence[str] = ()) -> list[str]:
    """MatMul with a constant B, Gemm and Conv nodes: the layers that carry weights."""
    inits = {i.name for i in model.graph.initializer}
    skip = set(exclude)
    return [
        n.name
        for n in model.graph.node
        if n.name not in skip
        and (n.op_type in ("Gemm", "Conv") or (n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits))
    ]


def masked_attention_scores(model: Any) -> list[str]:
    """The MatMuls that make attention scores under a mask computed at run time (token merging's
    ``log(size)``, a padding mask): two activations multiplied, then added to another activation,
    then soft-maxed (scaling by a constant between is looked through). A constant mask (a causal
    mask folded at export, a bias) does not count, nor do MatMuls with a weight."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    users: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)

    def only_user(name: str) -> Any:
        found = users.get(name, [])
        return found[0] if len(found) == 1 else None

    out = []
    for n in model.graph.node:
        if n.op_type != "MatMul" or len(n.input) < 2 or any(i in consts for i in n.input[:2]):
            continue
        nxt, value = only_user(n.output[0]), n.output[0]
        while nxt is not None and nxt.op_type in ("Mul", "Div") and any(i in consts for i in nxt.input):
            nxt, value = only_user(nxt.output[0]), nxt.output[0]
        if nxt is None or nxt.op_type != "Add":
            continue
        other = [i for i in nxt.input if i != value]
        softmax = only_user(nxt.output[0])
        if not other or other[0] in consts or softmax is None or softmax.op_type != "Softmax":
            continue
        out.append(n.name)
    return out


def save_model(model: Any, out_dir: Path) -> tuple[str, ...]:
    """Save a ModelProto as ``model.onnx``, external data past 2 GB."""
    import onnx

    external = over_size_limit(model)
    onnx.save_model(model, str(out_dir / ENTRY), save_as_external_data=external,
                    all_tensors_to_one_file=True, location=DATA)
    return written_files(out_dir)


def written_files(out_dir: Path) -> tuple[str, ...]:
    return (ENTRY,) + ((DATA,) if (out_dir / DATA).exists() else ())


def op_count(path: Path, *op_types: str) -> int:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(1 for n in graph.node if n.op_type in op_types)


def method_details(method: str, **fields: Any) -> dict[str, Any]:
    import onnxruntime

    return {"method": method, **fields, "library": "onnxruntime.quantization",
            "onnxruntime_version": onnxruntime.__version__}
