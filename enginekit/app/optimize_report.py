"""Classifier ``optimize``'s markdown report: the budget, the baseline and every candidate's fate."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from enginekit.bench.harness import DRIFT_WARN

__all__ = ["render_report"]

_FATE = {"picked": "**picked**", "passed": "passed", "rejected": "rejected", "failed": "failed"}


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _per_set(fid: Mapping[str, Any], key: str, spec: str) -> str:
    """``key`` on each held-out set ("0.9922 / 0.8400"), or the single number of an older report."""
    sets = fid.get("sets")
    if sets:
        return " / ".join(_fmt(s.get(key), spec) for s in sets)
    return _fmt(fid.get(key), spec)


def render_report(report: Mapping[str, Any]) -> str:
    """The markdown report: the budget, the baseline, and one row per candidate with its fate."""
    hw = report["hardware"]
    base = report["baseline"]
    after = report["baseline_after"]
    before = report.get("baseline_before", base)
    budget = report["budget"]
    lines = [
        f"# enginekit optimize: {report['model']}",
        "",
        f"- machine: {hw.get('cpu_model')}, {hw.get('logical_cores')} logical cores, "
        f"flags {', '.join(hw.get('flags') or []) or 'none'}",
        f"- batch {report['batch']}; budget against PyTorch eager fp32: top-1 agreement >= {budget['min_agreement']}, "
        f"logits cosine >= {budget['min_cosine']}",
        f"- held-out data: {report['data']['held_out']['source']} ({report['data']['held_out']['size']} samples); "
        f"calibration: {report['data']['calibration']['source']} ({report['data']['calibration']['size']} samples)",
        *([f"- second held-out set, made differently: {report['data']['second']['source']} "
           f"({report['data']['second']['size']} samples); every candidate is judged on both sets and the "
           "budget holds on the worse (agreement and cosine columns: held-out / second)"]
          if report["data"].get("second") else []),
        f"- baseline: PyTorch eager fp32 ({base['threads']} threads), p50 {before['latency_ms']['p50']:.2f} ms "
        f"timed before the engines and {after['latency_ms']['p50']:.2f} ms after them; speed-ups divide by the "
        f"faster, {base['latency_ms']['p50']:.2f} ms"
        + (" (**the machine's speed moved during the run: read the speed-ups with care**)"
           if abs(after["drift"] - 1) > DRIFT_WARN else ""),
        *([f"- ties: held-out samples whose PyTorch top-2 logit gap is under {report['tie_margin']} x the "
           "logits' standard deviation; the agreement budget counts the other (decided) samples only"]
          if report.get("tie_margin") else []),
        f"- picked: **{report['picked'] or 'none'}**",
        "",
        "| candidate | backend | precision | p50 ms | p90 ms | speed-up | agreement | cosine | accuracy | "
        "size MB | build s | fate |",
        "|:---|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|:---|",
        f"| pytorch eager (baseline) | pytorch | fp32 | {base['latency_ms']['p50']:.2f} | "
        f"{base['latency_ms']['p90']:.2f} | 1.00x | 1.0000 | 1.00000 | {_fmt(base['fidelity'].get('accuracy'), '.4f')} | "
        f"{(base['size_bytes'] or 0) / 1e6:.1f} | - | "
        "reference |",
    ]
    for oc in report["candidates"]:
        c, rec, fid = oc["candidate"], oc["record"] or {}, oc["fidelity"]
        lat = rec.get("latency_ms") or {}
        speed = rec.get("speedup")
        fate = _FATE.get(oc["status"], oc["status"]) + (f": {oc['reason']}" if oc["reason"] else "")
        lines.append(
            f"| {c['name']} | {c['backend']} | {c['precision']} | {_fmt(lat.get('p50'), '.2f')} | "
            f"{_fmt(lat.get('p90'), '.2f')} | {_fmt(speed, '.2f') + 'x' if speed else '-'} | "
            f"{_per_set(fid, 'top1_agreement', '.4f')}"
            + (f" ({fid['top1_agreement_decided']:.4f} decided)" if "top1_agreement_decided" in fid else "")
            + f" | {_per_set(fid, 'logits_cosine', '.5f')} | "
            f"{_fmt(fid.get('accuracy'), '.4f')} | {_fmt((rec.get('size_bytes') or 0) / 1e6 if rec else None, '.1f')} | "
            f"{_fmt(oc['build_s'], '.0f')} | {fate.replace('|', '/')} |"
        )
    lines += ["", "Latency is warm p50 at the batch above, timed in one run with the baseline; agreement and "
              "cosine are against PyTorch's outputs on each held-out set (never calibrated on).", ""]
    if report.get("rebuild"):
        lines += [f"Rebuild {report['picked']} by hand:", "", "```sh", *report["rebuild"], "```", ""]
    return "\n".join(lines)
