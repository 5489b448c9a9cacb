"""The ``enginekit`` command group and what its command modules share."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from enginekit import __version__
from enginekit.errors import EngineKitError, OptionError

_EXTRA_FOR = {"torch": "export", "timm": "export", "transformers": "export", "torchvision": "export",
              "onnxruntime": "onnxruntime", "openvino": "openvino", "sklearn": "data", "onnxscript": "export", "nncf": "quant", "matplotlib": "bench",
              "fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve", "multipart": "serve",
              "tokenizers": "pipelines", "onnx": "onnx"}


class _Group(click.Group):
    """Turns library errors into ``Error: <one line>`` and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OptionError as exc:  # an option that does not apply: a usage error, as click's own
            raise click.UsageError(str(exc)) from None
        except EngineKitError as exc:
            raise click.ClickException(str(exc)) from None
        except ModuleNotFoundError as exc:
            top = (exc.name or "").split(".")[0]
            if top in _EXTRA_FOR:
                raise click.ClickException(
                    f"this command needs {top}: pip install 'enginekit[{_EXTRA_FOR[top]}]'"
                ) from None
            raise
        except KeyboardInterrupt:
            click.echo("interrupted; no partial output was left behind", err=True)
            sys.exit(130)


def err_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="enginekit")
@click.option("-v", "--verbose", is_flag=True, help="Log what enginekit decides (device picked, cache used).")
def cli(verbose: bool) -> None:
    """Turn PyTorch models into compiled, quantized engines and run them.

    \b
    Stages, each reading an artifact folder and writing a new one:
      export MODEL -o onnx/           PyTorch -> ONNX, parity-checked (ViT or SD pipeline)
      compile onnx/ --backend B -o e/  ONNX -> ONNX Runtime or OpenVINO engine
      quantize onnx/ -m METHOD -o q/  fp16 / int8 / int4, gated on fidelity
      optimize MODEL -o best/         all of the above: the fastest engine that keeps its
                                      fidelity to PyTorch, with the commands that rebuild it
      evaluate q/ --data labelled/    accuracy and agreement with the float parent
      predict e/ IMAGES...            classify images with any artifact
      generate e/ PROMPT -o a.png     text-to-image with a pipeline artifact
      import FOLDER -o e/             a folder optimum-cli (OpenVINO) or optimum's ONNX export
                                      wrote, checked and hashed: the commands below run it
      inspect e/                      show what an artifact's manifest says, and its digest
      sign e/ --key key.pem           sign an artifact (check it with --verify-with key.pub)
      doctor                          hardware, installed backends, versions
      bench e/ f/ --batch 1,8         time engines; records go to a results store
      bench report results/ -o rep/   tables and plots per hardware and across
      demo                            the whole path on the built-in model
      serve e/ f/ --port 8000         HTTP: KServe v2, /v1/classify, /v1/generate, a web page
    """
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")



def backend_option(values: tuple[str, ...]) -> dict[str, Any]:
    """``--option key=value``: the value is read as JSON where it parses (numbers, true, lists), else a string."""
    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--option")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


DEVICE_HELP = ("cpu, gpu (CUDA on ONNX Runtime; refused where there is none), AUTO (OpenVINO's AUTO plugin "
                "picks) or auto (enginekit picks the best device here and says which)")


def batches(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: give batch sizes as 1,8,32") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{value!r}: batch sizes must be positive integers")
    return sizes


def csv(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None



class Params:
    """A command's parsed parameters by attribute (``o.out``), for commands with many options."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.__dict__.update(params)


def given_params(ctx: click.Context, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The parameters set on the command line (or the environment), by name: what was left
    unset stays unset, so the library applies its own default (one default per value)."""
    from click.core import ParameterSource

    return {name: value for name, value in ctx.params.items()
            if name not in exclude and ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)}
