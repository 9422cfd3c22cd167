"""Triggers for the trigger component's tests."""

from privsep.client import Context, Trigger, TriggerEvent, Workflow

wf = Workflow("trig")


class Explode(Trigger):
    def __init__(self, message: str, *, delay: float = 0.0):
        self.message = message
        self.delay = delay

    async def run(self):
        import asyncio

        await asyncio.sleep(self.delay)
        raise ValueError(self.message)
        yield TriggerEvent(None)  # an async generator that never gets here


class Quick(Trigger):
    def __init__(self, value: int, **extra: object):
        self.value = value
        self.extra = extra

    async def run(self):
        yield TriggerEvent({"value": self.value, "extra": self.extra})


@wf.task
def park_on_quick(ctx: Context):
    if ctx.trigger_event is None:
        ctx.defer(Quick(7, colour="blue"))
    return ctx.trigger_event.payload


@wf.task
def park_on_explode(ctx: Context):
    ctx.defer(Explode("trigger went bang"), timeout=600)
