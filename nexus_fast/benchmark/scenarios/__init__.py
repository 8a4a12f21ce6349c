"""Scenarios: each is ``async def run(ctx: Context) -> None`` filling ``ctx.report``."""
