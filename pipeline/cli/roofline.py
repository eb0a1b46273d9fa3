"""`tune roofline`: a run's per-kernel roofline, or this machine's ceilings measured again."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Column, Table

from pipeline.cli.common import TrackingUri, app, guard, out


@app.command()
def roofline(
    ref: Annotated[str | None, typer.Argument(help="MLflow run id, run folder or artifact folder.")] = None,
    calibrate: Annotated[bool, typer.Option(help="Measure this machine's ceilings again (and cache them).")] = False,
    target: Annotated[str, typer.Option(help="Preset whose ceilings --calibrate measures.")] = "auto",
    tracking_uri: TrackingUri = None,
    ceilings_dir: Annotated[Path | None, typer.Option(help="Ceilings cache (default ~/.cache/tvm-autotune/ceilings).")] = None,
    top: Annotated[int, typer.Option(help="Kernels to list, heaviest first.")] = 15,
) -> None:
    """Show a run's per-kernel roofline, or (--calibrate) measure this machine's ceilings."""
    guard(_roofline, ref, calibrate, target, tracking_uri, ceilings_dir, top)


def _roofline(ref, calibrate, target, tracking_uri, ceilings_dir, top) -> None:
    from pipeline.errors import UserError
    from pipeline.roofline import find_roofline, read_roofline, weighted_fraction
    from pipeline.tracking import tracking_uri as resolve_uri

    if calibrate:
        from pipeline import tvm_compat
        from pipeline.roofline import machine_ceilings
        from pipeline.runtime import use_threads
        from pipeline.targets import resolve_target

        tvm_compat.apply()
        resolved = resolve_target(target)
        threads = use_threads(resolved.cores)
        c = machine_ceilings(resolved.preset, resolved.tvm_target(), threads, ceilings_dir,
                             recalibrate=True)
        out.print(f"{c.cpu}, {c.threads} threads ({c.preset}): peak {c.peak_gflops:g} GFLOP/s "
                  f"({c.gemm}), int8 {c.peak_int8_gops:g} GOP/s ({c.gemm_int8}), bandwidth "
                  f"{c.bandwidth_gbs:g} GB/s ({c.stream}), ridge {c.ridge:.1f} flop/B")
        if ref is None:
            return
    if ref is None:
        raise UserError("give a run id, run folder or artifact folder (or --calibrate)")
    folder = find_roofline(ref, resolve_uri(tracking_uri))
    points, c = read_roofline(folder)
    out.print(f"ceilings: {c.peak_gflops:g} GFLOP/s fp32, {c.peak_int8_gops:g} GOP/s int8, "
              f"{c.bandwidth_gbs:g} GB/s, ridge {c.ridge:.1f} "
              f"flop/B ({c.cpu}, {c.threads} threads); kernels at {weighted_fraction(points):.0%} "
              "of attainable, time-weighted")
    table = Table(Column("kernel", overflow="fold"), "precision", "calls", "ms", "share", "flop/B",
                  "GFLOP/s", "roof", "fraction", "bound")
    for p in sorted(points, key=lambda p: -p.share)[:top]:
        table.add_row(p.kernel, p.precision, str(p.calls), f"{p.ms:.3f}", f"{p.share:.1%}", f"{p.intensity:.1f}",
                      f"{p.achieved_gflops:.0f}", f"{p.attainable_gflops:.0f}",
                      f"{p.fraction:.0%}", p.bound)
    out.print(table)
    out.print(f"plot: {folder / 'roofline.png'} | table: {folder / 'roofline.html'}")
