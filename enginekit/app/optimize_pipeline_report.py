"""Pipeline ``optimize``'s report: the markdown file and the rows the CLI's table shows."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["HEADERS", "table_rows", "table_text", "render_pipeline_report"]

def _f(value: Any, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def _samples(timing: Mapping[str, Any]) -> str:
    """How many steps and images a timing's medians took (and re-measures, if any)."""
    if not timing.get("step_samples"):
        return "-"
    again = timing.get("measurements", 1)
    return (f"{timing['step_samples']} / {timing['image_samples']}"
            + (f" ({again} measurements)" if again > 1 else ""))


def table_rows(report: Mapping[str, Any]) -> list[list[str]]:
    """One row per candidate (after diffusers'): name, precisions, step ms, image ms, samples, speed-ups,
    worst/mean PSNR, speed-up vs the backend's fp32 and the component it came from, fate."""
    base = report["baseline"]
    rows = [["diffusers eager (baseline)", "fp32", _f(base["step_ms"], ".1f"), _f(base["image_ms"], ".0f"),
             _samples(base), "1.00x", "1.00x", "reference", "-", "-", "baseline"]]
    for oc in report["candidates"]:
        c, t, fid, vs = oc["candidate"], oc.get("timing") or {}, oc.get("fidelity") or {}, oc.get("vs_fp32") or {}
        precisions = ", ".join(f"{k if k != '*' else 'rest' if len(c['precisions']) > 1 else 'all'} {v}"
                               for k, v in c["precisions"].items())
        came = "-" if not vs else (f"{vs['step']:.2f}x ({vs['from']} {vs['components'].get(vs['from'], 0):.2f}x)"
                                   if vs.get("from") else f"{vs['step']:.2f}x (no component faster)")
        fate = oc["status"] + (f": {oc['reason']}" if oc["reason"] and oc["status"] != "picked" else "")
        rows.append([c["name"], precisions, _f(t.get("step_ms"), ".1f"), _f(t.get("image_ms"), ".0f"), _samples(t),
                     _f(oc.get("speedup_step"), ".2f", "x"), _f(oc.get("speedup_image"), ".2f", "x"),
                     f"{_f(fid.get('psnr_db_min'), '.2f')} / {_f(fid.get('psnr_db_mean'), '.2f')}" if fid else "-",
                     came, _f(oc.get("size_bytes") and oc["size_bytes"] / 1e6, ".0f"), fate])
    return rows


HEADERS = ["candidate", "precision", "step ms", "image ms", "samples steps / images", "step speed-up",
           "image speed-up",
           "PSNR dB worst / mean", "vs own fp32 (from)", "size MB", "fate"]


def table_text(report: Mapping[str, Any]) -> str:
    return "\n".join("| " + " | ".join(r).replace("\n", " ") + " |" for r in [HEADERS, *table_rows(report)])


def _call(timing: Mapping[str, Any], component: str) -> str:
    n = (timing.get("component_samples") or {}).get(component)
    return _f(timing["components_ms"].get(component), ".1f") + (f" ({n})" if n else "")


def render_pipeline_report(report: Mapping[str, Any]) -> str:
    """The markdown report: the run's settings, the baseline and one row per candidate with its fate."""
    hw, base = report["hardware"], report["baseline"]
    held = report["held_out"]
    lines = [
        f"# enginekit optimize: {report['model']} ({report['family']})",
        "",
        f"- machine: {hw.get('cpu_model')}, {hw.get('logical_cores')} logical cores, "
        f"flags {', '.join(hw.get('flags') or []) or 'none'}",
        f"- {report['size']}x{report['size']}, batch 1, {report['steps']} {report['scheduler']} steps, guidance "
        f"{report['guidance']}; {report['denoiser']} step = both CFG passes + guidance + scheduler step",
        f"- budget: image PSNR >= {report['budget']['min_psnr_db']:g} dB against diffusers fp32 on the same latents, "
        f"on the worst of {len(held['prompts']) * len(held['seeds'])} held-out image(s) "
        f"({len(held['prompts'])} prompt(s) x seeds {', '.join(map(str, held['seeds']))}); SSIM "
        + ("judged too" if report["budget"].get("min_ssim") is not None else "not judged"),
        f"- baseline: diffusers fp32 eager ({base['threads']} threads): step {base['before']['step_ms']:.1f} ms before "
        f"the engines, {base['after']['step_ms']:.1f} ms after; speed-ups divide by the faster"
        + (" (**the machine's speed moved during the run**)" if abs(base["drift"] - 1) > 0.15 else ""),
        f"- picked: **{report['picked'] or 'none'}**",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join([":---", ":---"] + ["---:"] * 8 + [":---"]) + "|",
        *("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in table_rows(report)),
        "",
        "Times are medians: a step is the time between two step ends (the first step is never counted), an "
        "image the whole generation, after one untimed warm-up image; each engine ran alone. After the judged "
        f"images each side repeated them for time only: {report['timing_rule']['text']}; the samples column "
        "says how many steps and images each median took. A step contains the denoiser's call (timed on the "
        "same steps); a step below it is an impossible timing, measured again up to "
        f"{report['timing_rule']['remeasures']} times and never picked. "
        "\"vs own fp32\": the step speed-up over the same backend's all-fp32 candidate, and the component "
        "whose calls saved the most time per image, with its own speed-up per call.",
        "",
    ]
    per = [oc for oc in report["candidates"] if oc.get("timing")]
    if per:
        comps = sorted({c for oc in per for c in oc["timing"]["components_ms"]})
        lines += ["Per-component time per call (ms, median; in brackets the calls it took; the denoiser's "
                  "only inside timed steps):", "",
                  "| candidate | " + " | ".join(comps) + " |", "|:---|" + "---:|" * len(comps),
                  "| diffusers eager | " + " | ".join(_call(base, c) for c in comps) + " |",
                  *(f"| {oc['candidate']['name']} | " + " | ".join(_call(oc["timing"], c) for c in comps) + " |"
                    for oc in per), ""]
    if report.get("rebuild"):
        lines += [f"Rebuild {report['picked']} by hand:", "", "```sh", *report["rebuild"], "```", ""]
    return "\n".join(lines)
