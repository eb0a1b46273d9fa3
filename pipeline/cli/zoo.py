"""What there is to run: `tune models` (the zoo, or one model's weight sparsity), `tune prune` and
`tune targets`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pipeline.cli.common import ModelOptions, app, guard, out


@app.command()
def models(
    model: Annotated[str | None, typer.Argument(help="Show the sparsity of each linear weight of this zoo model or .onnx file instead.")] = None,
    model_option: ModelOptions = None,
    block: Annotated[str, typer.Option(help="Block RxC for the block-sparsity column.")] = "1x16",
) -> None:
    """List the zoo: names, input specs, parameter counts and GFLOPs (or one model's weight sparsity)."""
    if model is None:
        guard(_models)
    else:
        guard(_sparsity, model, model_option, block)


def _models() -> None:
    from pipeline.models import list_models
    from pipeline.models.stats import graph_stats

    table = Table("name", "inputs", "params (M)", "GFLOPs", "description")
    for entry in list_models():
        stats = graph_stats(entry.build())
        inputs = ", ".join(f"{s.name}:{s.dtype}{list(s.shape)}" for s in stats.inputs)
        table.add_row(entry.name, inputs, f"{stats.params / 1e6:.2f}", f"{stats.flops / 1e9:.3f}",
                      entry.description)
    out.print(table)


def _load_weights(model: str, model_option, block: str):
    """The model's ONNX proto and the (rows, columns) block that --block names."""
    from pipeline.config import parse_model_options
    from pipeline.importer import load_onnx
    from pipeline.passes.sparse import parse_block

    rc = parse_block(block) or (1, 16)
    _, proto, _ = load_onnx(model, parse_model_options(model_option or []))
    return proto, rc


def _sparsity(model: str, model_option, block: str) -> None:
    from pipeline.prune import sparsity_report

    proto, rc = _load_weights(model, model_option, block)
    table = Table("weight", "op", "shape", "sparsity", f"block sparsity ({rc[0]}x{rc[1]})")
    for r in sparsity_report(proto, rc):
        table.add_row(r.name, r.op, "x".join(map(str, r.shape)), f"{r.sparsity:.1%}",
                      f"{r.block_sparsity:.1%}")
    out.print(table)


@app.command()
def prune(
    model: Annotated[str, typer.Argument(help="Zoo name or .onnx path.")],
    sparsity: Annotated[float, typer.Option(help="Fraction of each linear weight to zero, e.g. 0.9.")] = 0.9,
    block: Annotated[str, typer.Option(help="1x1 (unstructured) or RxC blocks of the [K, N] weight, e.g. 1x16.")] = "1x16",
    out_path: Annotated[Path, typer.Option("--out", help="Where the pruned .onnx goes.")] = Path("pruned.onnx"),
    model_option: ModelOptions = None,
) -> None:
    """Magnitude-prune the MatMul/Gemm/1x1-Conv weights of a model (for `tune run --sparse auto`)."""
    guard(_prune, model, sparsity, block, out_path, model_option)


def _prune(model: str, sparsity: float, block: str, out_path: Path, model_option) -> None:
    import onnx

    from pipeline.prune import prune_model, sparsity_report

    proto, rc = _load_weights(model, model_option, block)
    pruned = prune_model(proto, sparsity, rc)
    onnx.save(pruned, out_path)
    rows = sparsity_report(pruned, rc)
    mean = sum(r.sparsity for r in rows) / len(rows)
    out.print(f"pruned {len(rows)} weights to {mean:.1%} zeros ({rc[0]}x{rc[1]} blocks) -> {out_path}")


@app.command()
def targets() -> None:
    """List the target presets and say what `--target auto` picks here, and why."""
    guard(_targets)


def _targets() -> None:
    from pipeline.targets import detect_host, load_presets, resolve_target

    host = detect_host()
    auto = resolve_target("auto", host)
    table = Table("preset", "requires", "mcpu / arch", "published ceilings", "description")
    for p in load_presets().values():
        mark = " [green](auto)[/]" if p.name == auto.preset else ""
        table.add_row(p.name + mark, " ".join(p.requires), p.target.get("mcpu") or p.target.get("arch", ""),
                      _ceilings_line(p.ceilings), p.description)
    out.print(table)
    out.print(f"auto -> [bold]{auto.preset}[/]: {auto.reason}")
    out.print(f"target: {json.dumps(auto.target_dict)}")


def _ceilings_line(c: dict) -> str:
    if "fp32_tflops" in c:
        half = f", fp16 TC {c['fp16_tensor_tflops']:g}" if "fp16_tensor_tflops" in c else ""
        return f"{c['device']}: fp32 {c['fp32_tflops']:g}{half} TFLOP/s, {c['bandwidth_gbs']:g} GB/s"
    if "fp32_flop_per_cycle_per_core" in c:
        int8 = f", int8 {c['int8_op_per_cycle_per_core']}" if "int8_op_per_cycle_per_core" in c else ""
        return f"fp32 {c['fp32_flop_per_cycle_per_core']}{int8} /cycle/core"
    return "-"
