"""Several workflows in one file: schedules of each kind, options, ids given explicitly, a
workflow that is built in a factory and never bound to a module-level name."""

from datetime import timedelta

from privsep.client import Context, Workflow

hourly = Workflow("shapes_hourly", schedule="@hourly")
cron = Workflow("shapes_cron", schedule="*/5 * * * *")
every = Workflow("shapes_every", schedule=timedelta(minutes=90))


@hourly.task
def first(ctx: Context) -> None:
    return None


@hourly.task(upstream=[first], retries=3, retry_delay=timedelta(seconds=30), timeout=12.5)
def second(ctx: Context) -> None:
    return None


@hourly.task(upstream=[first, second], task_id="third-step")
def third(ctx: Context) -> None:
    return None


@cron.task
def only(ctx: Context) -> None:
    return None


@every.task(upstream=["later"])  # by id: declared further down
def sooner(ctx: Context) -> None:
    return None


@every.task
def later(ctx: Context) -> None:
    return None


def _factory() -> None:
    made = Workflow("shapes_factory")
    for name in ("a", "b"):

        def step(ctx: Context, name: str = name) -> str:
            return name

        made.task(task_id=f"step_{name}")(step)


_factory()
