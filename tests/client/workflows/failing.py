"""Tasks that fail in each way a task can: raise, return something that is not JSON."""

from privsep.client import Context, Workflow

wf = Workflow("failing")


@wf.task(retries=1)
def boom(ctx: Context) -> None:
    raise RuntimeError(f"boom on try {ctx.try_number}")


@wf.task
def not_json(ctx: Context) -> object:
    return object()
