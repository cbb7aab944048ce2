"""Plain-text ``--help`` with options grouped by panel (RSA / backend / server / output).

Click's own layout wraps help text to the terminal and moves it under a long flag instead of
cutting the flag short, so every flag name stays whole at 80 columns.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperArgument, TyperCommand

OTHER_PANEL = "Options"
PANEL_ORDER = ("RSA parameters", "Backend", "Server", "Simulation", "Output", OTHER_PANEL)


class GroupedCommand(TyperCommand):
    """A Typer command whose help lists its arguments, then its options under their panels."""

    def format_options(self, ctx: Any, formatter: Any) -> None:
        arguments = [
            (param.metavar or str(param.name).upper(), param.help or "")
            for param in self.get_params(ctx)
            if isinstance(param, TyperArgument) and not param.hidden
        ]
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(arguments)
        panels: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None and not isinstance(param, TyperArgument):
                panel = getattr(param, "rich_help_panel", None) or OTHER_PANEL
                panels.setdefault(panel, []).append(record)
        order = {panel: index for index, panel in enumerate(PANEL_ORDER)}
        for panel, rows in sorted(panels.items(), key=lambda item: order.get(item[0], len(order))):
            with formatter.section(panel):
                formatter.write_dl(rows)
