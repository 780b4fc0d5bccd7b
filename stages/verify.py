"""`mm verify PATH`: check a token store, a checkpoint (or a run directory of them) or an export."""

from __future__ import annotations

from typing import Annotated

import typer


def verify(
    path: Annotated[str, typer.Argument(
        help="Token store (a directory or an s3://, gs://, az:// URL), checkpoint, run directory or export.")],
) -> None:
    """Recompute every recorded hash and check token ids and offsets; exit 1 naming the first bad file."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from pipeline.data.store.remote import location
    from pipeline.errors import UserError
    from pipeline.verify import verify as run_checks

    path = location(path)
    kind, rows = run_checks(path)
    table = Table(title=f"{path} ({kind})")
    for col in ("file", "check", "result"):
        table.add_column(col, overflow="fold")
    for row in rows:
        shown = row.path.relative_to(path) if row.path.is_relative_to(path) and row.path != path else row.path
        mark = "[green]ok[/green]" if row.ok else "[red]BAD[/red]"
        table.add_row(escape(str(shown)), row.check, f"{mark}  {escape(row.detail)}")
    Console().print(table)
    bad = next((row for row in rows if not row.ok), None)
    if bad is not None:
        raise UserError(f"{bad.path}: {bad.detail}")
