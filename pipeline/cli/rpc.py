"""`tune rpc`: distributed measurement over TVM RPC (the tracker's servers and queue)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from pipeline.cli.common import app, guard, out

rpc_app = typer.Typer(no_args_is_help=True, help="Distributed measurement over TVM RPC.")
app.add_typer(rpc_app, name="rpc")


@rpc_app.command("status")
def rpc_status(
    tracker: Annotated[str, typer.Option(help="The tracker, HOST:PORT.")] = "127.0.0.1:9190",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON line instead of the tables.")] = False,
) -> None:
    """The tracker's servers and its queue per device key."""
    guard(_rpc_status, tracker, as_json)


def _rpc_status(tracker: str, as_json: bool) -> None:
    from dataclasses import asdict

    from pipeline.rpc import tracker_status

    status = tracker_status(tracker)
    if as_json:
        print(json.dumps({"servers": status.servers, "queue": [asdict(q) for q in status.queue]}))
        return
    table = Table("device key", "servers", "free", "pending requests")
    for q in status.queue:
        table.add_row(q.key, str(q.total), str(q.free), str(q.pending))
    out.print(table)
    for s in status.servers:
        out.print(f"  {s['address']}  {s['key']}")
