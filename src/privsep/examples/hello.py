"""The smallest useful workflow: two tasks and an XCom between them."""

from privsep.client import Context, Workflow

wf = Workflow("hello", schedule=None)


@wf.task
def greet(ctx: Context) -> str:
    return f"hello from run {ctx.run_id[:8]}"


@wf.task(upstream=[greet])
def echo(ctx: Context) -> str:
    message = str(ctx.xcom_pull("greet"))
    ctx.log.info("%s", message)
    return message
