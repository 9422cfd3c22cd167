"""The example from issue 6, as a workflow author writes it."""

from privsep.client import Context, Trigger, TriggerEvent, Workflow

wf = Workflow("etl", schedule=None)  # schedule: None, "@hourly", a cron string or a timedelta


@wf.task
def extract(ctx: Context) -> dict:
    return {"rows": 3}  # a JSON-serializable return value becomes this task's XCom


@wf.task(upstream=[extract], retries=2, retry_delay=5, timeout=60)
def load(ctx: Context) -> int:
    data = ctx.xcom_pull("extract")
    table = ctx.get_variable("etl_target", default="t")
    conn = ctx.get_connection("warehouse")  # .host .port .login .password .schema .extra
    ctx.log.info("loading %s rows into %s on %r", data["rows"], table, conn)
    return data["rows"]


class Sleep(Trigger):  # async, runs in a trigger sandbox
    def __init__(self, seconds: float):
        self.seconds = seconds

    async def run(self):
        import asyncio

        await asyncio.sleep(self.seconds)
        yield TriggerEvent({"slept": self.seconds})


@wf.task(upstream=[load])
def wait_then_finish(ctx: Context):
    if ctx.trigger_event is None:
        return ctx.defer(Sleep(1.0))  # the task is parked; no sandbox is held while it waits
    return ctx.trigger_event.payload["slept"]
