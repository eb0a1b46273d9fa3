"""`tune predict`: run an exported artifact on given inputs, or replay its verification sample."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import app, guard, out


@app.command()
def predict(
    artifact: Annotated[Path, typer.Argument(help="An exported artifact folder.")],
    input_path: Annotated[Path | None, typer.Option("--input", "-i", help=".npy (one input) or .npz keyed by input name.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write outputs (.npy, or .npz for several).")] = None,
    check: Annotated[bool, typer.Option(help="Run the stored verification input and compare with the stored output.")] = False,
) -> None:
    """Run an exported artifact (hashes checked; no tuning code is loaded)."""
    guard(_predict, artifact, input_path, output, check)


def _predict(artifact: Path, input_path, output, check: bool) -> None:
    import numpy as np

    from pipeline.cross import check_against_reference
    from pipeline.errors import UserError
    from pipeline.export import load_artifact, read_inputs

    if input_path is None and not check:
        raise UserError("pass --input FILE, or --check to replay the verification sample")
    loaded = load_artifact(artifact)
    if check:
        stored = np.load(artifact / "verify.npz")
        inputs = [stored[f"input:{n}"] for n in loaded.input_names()]
        expected = [stored[k] for k in sorted(k for k in stored.files if k.startswith("output:"))]
    else:
        inputs = read_inputs(loaded, input_path)
    results = loaded.model(inputs)
    if check:
        out.print(check_against_reference(results, expected, loaded.manifest.get("verification", {})))
    if output is not None:
        if len(results) == 1 and output.suffix == ".npy":
            np.save(output, results[0])
        else:
            np.savez(output, **{s["name"]: r for s, r in zip(loaded.manifest["outputs"], results)})
        out.print(f"wrote {output}")
    elif not check:
        for s, r in zip(loaded.manifest["outputs"], results):
            out.print(f"{s['name']}: shape {list(r.shape)} {r.dtype}, first values {r.ravel()[:5]}")
