"""A Celery app that steps the `apps.counting` migrations (backfill.integrations.celery), for the
end-to-end test: `celery -A apps.celery_app worker -Q QUEUE` runs it, the test sends with its
own `make_app(QUEUE)`.

Broker: the RabbitMQ the tests use (`BACKFILL_TEST_AMQP_URL` overrides it); results go back to
the sender over it (`rpc://`). The environment, set by the test for its workers:
`BACKFILL_CELERY_DATABASE_URL` (the database), `BACKFILL_CELERY_QUEUE` (a queue of the test's
own, so messages left by other runs never reach it), `BACKFILL_CELERY_BUDGET` and
`BACKFILL_CELERY_COUNTDOWN` (seconds).
"""

from __future__ import annotations

import os

from celery import Celery

from apps.counting import migrations
from backfill import Runner
from backfill.integrations.celery import Steps, backfill_steps

BROKER_URL = os.environ.get("BACKFILL_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
DATABASE_ENV = "BACKFILL_CELERY_DATABASE_URL"
QUEUE_ENV = "BACKFILL_CELERY_QUEUE"
BUDGET_ENV = "BACKFILL_CELERY_BUDGET"
COUNTDOWN_ENV = "BACKFILL_CELERY_COUNTDOWN"


def make_app(queue: str) -> tuple[Celery, Steps]:
    """The app with its step task, every message of it on `queue`."""
    app = Celery("backfill_test", broker=BROKER_URL, backend="rpc://")
    app.conf.update(
        task_default_queue=queue,
        worker_prefetch_multiplier=1,  # a worker reserves no step beyond the one it runs
        broker_connection_retry_on_startup=True,
        # rpc:// reply queues (a worker's gets the results of the steps it sends) expire a
        # minute after their last use, not a day.
        result_expires=60,
    )
    steps = backfill_steps(
        app,
        runner=lambda: Runner(os.environ[DATABASE_ENV], migrations),
        budget_seconds=float(os.environ.get(BUDGET_ENV, "0.3")),
        countdown=float(os.environ.get(COUNTDOWN_ENV, "0.5")),
    )
    return app, steps


app, steps = make_app(os.environ.get(QUEUE_ENV, "backfill-test"))
