"""Extract, load, then wait on an async trigger: a variable, a connection, an XCom, a deferral.

The default policy of ``runner standalone`` grants this workflow the variable ``etl_target``
and the connection ``warehouse``; without that grant ``load`` fails with ``NotPermitted``.
"""

from collections.abc import AsyncIterator
from typing import Any

from privsep.client import Context, Trigger, TriggerEvent, Workflow

wf = Workflow("etl", schedule=None)


@wf.task
def extract(ctx: Context) -> dict[str, Any]:
    ctx.log.info("extracting")
    return {"rows": 3}  # the return value becomes this task's XCom


@wf.task(upstream=[extract], retries=2, retry_delay=5, timeout=60)
def load(ctx: Context) -> int:
    data: dict[str, int] = ctx.xcom_pull("extract")
    table = ctx.get_variable("etl_target", default="t")
    conn = ctx.get_connection("warehouse")  # its repr masks the password
    ctx.log.info("loading %s rows into %s via %r", data["rows"], table, conn)
    return int(data["rows"])


class Sleep(Trigger):
    """Runs in a trigger sandbox's event loop while the task holds no sandbox at all."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def run(self) -> AsyncIterator[TriggerEvent]:
        import asyncio

        await asyncio.sleep(self.seconds)
        yield TriggerEvent({"slept": self.seconds})


@wf.task(upstream=[load])
def wait_then_finish(ctx: Context) -> float:
    if ctx.trigger_event is None:
        ctx.defer(Sleep(1.0))  # ends this try; the task runs again when the trigger fires
    return float(ctx.trigger_event.payload["slept"])
