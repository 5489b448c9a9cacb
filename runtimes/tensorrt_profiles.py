"""TensorRT optimization profiles: what input shapes a plan is built for. Torch- and TensorRT-free.

A plan built from a graph with dynamic dimensions runs only at the shapes its optimization
profiles cover: each profile gives every dynamic input a ``min``, ``opt`` and ``max`` shape,
and TensorRT tunes its kernels for ``opt``. Two spellings make them:

- trtexec's: ``name:MIN/OPT/MAX`` with shapes as ``1x3x384x384``, inputs joined by commas,
  one string per profile (trtexec's ``--minShapes/--optShapes/--maxShapes`` folded into one
  value). A pipeline's input may be named ``component:name`` (``unet:sample:...``).
- per symbolic dimension: ``{"batch": (1, 1, 32)}``, per component or for all (key ``"*"``),
  which is how a task states its defaults (a classifier's batch range; a pipeline's image
  size and batch buckets, :mod:`enginekit.runtimes.tasks.pipeline_compile`).

:func:`component_profiles` resolves both against one component's inputs and refuses, in one
line, a profile that misses a dynamic input, names an input the component lacks, disagrees
with a fixed dimension or has ``min <= opt <= max`` broken.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from enginekit.errors import BackendError, ShapeError
from enginekit.manifest import TensorSpec

__all__ = ["ShapeRange", "Profile", "parse_shapes", "parse_dim_ranges", "component_profiles", "profiles_to_json",
           "profiles_from_json", "pick_profile"]

Shape = tuple[int, ...]
_SHAPE = re.compile(r"^\d+(x\d+)*$")


@dataclass(frozen=True)
class ShapeRange:
    """One input's shapes in one profile (trtexec's min, opt and max)."""

    min: Shape
    opt: Shape
    max: Shape

    def covers(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.min) and all(lo <= d <= hi for lo, d, hi in zip(self.min, shape, self.max))

    @property
    def static(self) -> bool:
        return self.min == self.opt == self.max

    def text(self) -> str:
        return "/".join("x".join(map(str, s)) for s in (self.min, self.opt, self.max))


#: One optimization profile: input name -> its range.
Profile = Mapping[str, ShapeRange]


def _shape(text: str, where: str) -> Shape:
    text = text.strip()
    if text == "":  # a scalar input: trtexec writes it as an empty shape
        return ()
    if not _SHAPE.match(text):
        raise BackendError(f"tensorrt: {where}: {text!r} is not a shape (write it as trtexec does: 1x3x224x224)")
    return tuple(int(d) for d in text.split("x"))


def parse_shapes(spec: str) -> dict[str, ShapeRange]:
    """One profile from trtexec-style text: ``name:MIN/OPT/MAX[,name2:MIN/OPT/MAX...]``.

    ``name:SHAPE`` alone means min = opt = max (a static profile). Names keep everything
    before the last colon, so ``unet:sample:2x4x64x64`` names input ``sample`` of ``unet``.
    """
    out: dict[str, ShapeRange] = {}
    for part in [p for p in spec.split(",") if p.strip()]:
        name, sep, shapes = part.strip().rpartition(":")
        if not sep or not name:
            raise BackendError(f"tensorrt: shapes {part!r} must read NAME:MIN/OPT/MAX (trtexec's shapes, e.g. "
                               "pixel_values:1x3x384x384/8x3x384x384/32x3x384x384)")
        pieces = shapes.split("/")
        if len(pieces) == 1:
            pieces = pieces * 3
        if len(pieces) != 3:
            raise BackendError(f"tensorrt: shapes for {name!r} give {len(pieces)} shapes; give MIN/OPT/MAX or one")
        lo, opt, hi = (_shape(p, f"shapes for {name!r}") for p in pieces)
        if name in out:
            raise BackendError(f"tensorrt: one profile gives {name!r} twice; a second profile is a second --shapes")
        out[name] = _checked(name, ShapeRange(lo, opt, hi))
    if not out:
        raise BackendError("tensorrt: an empty shapes profile; give NAME:MIN/OPT/MAX")
    return out


def _checked(name: str, r: ShapeRange) -> ShapeRange:
    if not len(r.min) == len(r.opt) == len(r.max):
        raise BackendError(f"tensorrt: {name}: min, opt and max have different ranks ({r.text()})")
    for axis, (lo, opt, hi) in enumerate(zip(r.min, r.opt, r.max)):
        if not lo <= opt <= hi:
            raise BackendError(f"tensorrt: {name}: axis {axis} must have min <= opt <= max, got {lo}/{opt}/{hi} "
                               f"({r.text()})")
        if lo < 0:
            raise BackendError(f"tensorrt: {name}: axis {axis} has a negative size ({r.text()})")
    return r


def parse_dim_ranges(value: Any, where: str = "dim_ranges") -> dict[str, tuple[int, int, int]]:
    """``{"batch": "1/1/32"}`` or ``{"batch": [1, 1, 32]}`` (one number: all three) -> checked triples."""
    if not isinstance(value, Mapping):
        raise BackendError(f"tensorrt: {where} must map dimension names to MIN/OPT/MAX, got {value!r}")
    out: dict[str, tuple[int, int, int]] = {}
    for dim, spec in value.items():
        if isinstance(spec, str):
            parts: list[Any] = spec.split("/")
        elif isinstance(spec, (list, tuple)):
            parts = list(spec)
        else:
            parts = [spec]
        if len(parts) == 1:
            parts = parts * 3
        try:
            lo, opt, hi = (int(p) for p in parts)
        except (TypeError, ValueError):
            raise BackendError(f"tensorrt: {where}[{dim!r}] must be MIN/OPT/MAX sizes, got {spec!r}") from None
        if not 1 <= lo <= opt <= hi:
            raise BackendError(f"tensorrt: {where}[{dim!r}] must have 1 <= min <= opt <= max, got {lo}/{opt}/{hi}")
        out[str(dim)] = (lo, opt, hi)
    return out


def _from_dims(spec: TensorSpec, dims: Mapping[str, tuple[int, int, int]]) -> ShapeRange | None:
    """The input's range where every symbolic dimension is in ``dims``; None where one is not."""
    if all(isinstance(d, int) and d >= 0 for d in spec.shape):
        return None
    picks: list[tuple[int, int, int]] = []
    for d in spec.shape:
        if isinstance(d, int) and d >= 0:
            picks.append((d, d, d))
        elif isinstance(d, str) and d in dims:
            picks.append(dims[d])
        else:
            return None
    return ShapeRange(*(tuple(p[i] for p in picks) for i in range(3)))


def component_profiles(component: str, inputs: Sequence[TensorSpec], shapes: Sequence[Mapping[str, ShapeRange]],
                       dim_profiles: Sequence[Mapping[str, tuple[int, int, int]]]) -> list[dict[str, ShapeRange]]:
    """The optimization profiles of one component: one per entry of ``shapes`` (parsed trtexec
    strings, their names plain or ``component:input``; entries naming only other components are
    skipped), else one per entry of ``dim_profiles``; every dynamic input covered, every fixed
    dimension kept. [] for a component whose inputs are all static."""
    dynamic = [s for s in inputs if not all(isinstance(d, int) and d >= 0 for d in s.shape)]
    by_name = {s.name: s for s in inputs}
    profiles: list[dict[str, ShapeRange]] = []
    for given in shapes:
        mine = _mine(component, given)
        if not mine:
            continue
        unknown = sorted(set(mine) - set(by_name))
        if unknown:
            raise BackendError(f"tensorrt: shapes name {unknown[0]!r}, which {component!r} does not take "
                               f"(inputs: {', '.join(by_name)})")
        profile = {name: _fits(component, by_name[name], r) for name, r in mine.items()}
        for spec in dynamic:  # what the text leaves out, the dimension ranges may give
            if spec.name not in profile:
                found = next((r for dims in dim_profiles if (r := _from_dims(spec, dims)) is not None), None)
                if found is None:
                    raise BackendError(f"tensorrt: {component!r} input {spec.name!r} {_fmt(spec.shape)} is dynamic and "
                                       f"no profile covers it; add {spec.name}:MIN/OPT/MAX to --shapes")
                profile[spec.name] = found
        profiles.append(profile)
    if profiles or not dynamic:
        return profiles
    for dims in dim_profiles:
        profile = {}
        for spec in dynamic:
            found = _from_dims(spec, dims)
            if found is None:
                missing = [d for d in spec.shape if isinstance(d, str) and d not in dims]
                raise BackendError(f"tensorrt: {component!r} input {spec.name!r} {_fmt(spec.shape)} is dynamic and no "
                                   f"profile covers dimension {missing[0]!r}; give --shapes {spec.name}:MIN/OPT/MAX")
            profile[spec.name] = found
        profiles.append(profile)
    if not profiles:
        names = ", ".join(f"{s.name} {_fmt(s.shape)}" for s in dynamic)
        raise BackendError(f"tensorrt: {component!r} has dynamic inputs ({names}) and no optimization profile; "
                           "give --shapes NAME:MIN/OPT/MAX (trtexec's syntax)")
    return profiles


def _mine(component: str, given: Mapping[str, ShapeRange]) -> dict[str, ShapeRange]:
    out = {}
    for key, r in given.items():
        owner, sep, name = key.rpartition(":")
        if not sep:
            out[key] = r
        elif owner == component:
            out[name] = r
    return out


def _fits(component: str, spec: TensorSpec, r: ShapeRange) -> ShapeRange:
    if len(r.min) != len(spec.shape):
        raise BackendError(f"tensorrt: {component!r} input {spec.name!r} has rank {len(spec.shape)} "
                           f"{_fmt(spec.shape)}; the shapes given have rank {len(r.min)} ({r.text()})")
    for axis, d in enumerate(spec.shape):
        if isinstance(d, int) and d >= 0 and not r.min[axis] == r.opt[axis] == r.max[axis] == d:
            raise BackendError(f"tensorrt: {component!r} input {spec.name!r} axis {axis} is fixed at {d}; "
                               f"the shapes given say {r.text()}")
    return r


def _fmt(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def profiles_to_json(profiles: Sequence[Mapping[str, ShapeRange]]) -> list[dict[str, dict[str, list[int]]]]:
    """The manifest's record: per profile, input -> {"min": [...], "opt": [...], "max": [...]}."""
    return [{name: {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)} for name, r in p.items()}
            for p in profiles]


def profiles_from_json(data: Any) -> list[dict[str, ShapeRange]]:
    """The inverse of :func:`profiles_to_json` (a malformed record is a one-line error)."""
    try:
        return [{name: ShapeRange(tuple(r["min"]), tuple(r["opt"]), tuple(r["max"])) for name, r in p.items()}
                for p in (data or [])]
    except (TypeError, KeyError, AttributeError) as exc:
        raise BackendError(f"tensorrt: the manifest's profiles are malformed ({exc!r}); compile the plan again") from None


def pick_profile(profiles: Sequence[Mapping[str, ShapeRange]], shapes: Mapping[str, Sequence[int]]) -> int:
    """The first profile covering every input's shape (0 when there are none: a static plan);
    a one-line error naming what the plan was built for otherwise."""
    if not profiles:
        return 0
    for index, profile in enumerate(profiles):
        if all(name not in shapes or r.covers(shapes[name]) for name, r in profile.items()):
            return index
    built = "; ".join(", ".join(f"{n} {r.text()}" for n, r in p.items()) for p in profiles)
    got = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in shapes.items())
    raise ShapeError(f"tensorrt: no optimization profile of this plan covers {got} (built for: {built}); "
                       "compile again with --shapes covering it")
