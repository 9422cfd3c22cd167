"""Discovery's reports to the server: the definition files to parse and the ones deleted.

The server takes a supervisor's word only for the files it reported first and the workflows
those files define (see :mod:`privsep.server.services.discovery_reports`). A refusal of that
kind is final: the file is logged and skipped, never sent again at every scan, and the rest
of the report still counts.
"""

from __future__ import annotations

import logging
from typing import Any

from privsep.runner.api.session import ApiRefused, SupervisorApi

log = logging.getLogger("privsep.supervisor")

PARSE_JOBS_PER_REQUEST = 1000  # the server's ParseJobBatchRequest limit


def _not_owner(exc: ApiRefused) -> bool:
    """The server refused a report about another supervisor's file or workflow: final, so
    it is logged and not sent again at every scan."""
    return exc.status == 403 and exc.code == "not_owner"


def report_deleted(api: SupervisorApi, uris: list[str]) -> None:
    """Tell the server these definition files are gone. One that another supervisor
    reported first is refused whole; then each is sent alone, so this supervisor's own
    deletions still count."""
    try:
        api.call("POST", "/v1/supervisor/deleted-files", {"uris": uris})
    except ApiRefused as exc:
        if not _not_owner(exc):
            raise
        if len(uris) == 1:
            log.warning("deleted file %s not reported: %s", uris[0], exc)
            return
        for uri in uris:
            report_deleted(api, [uri])


def queue_parse_jobs(api: SupervisorApi, jobs: list[dict[str, Any]], *, batch: bool) -> bool:
    """Queue a parse of each changed file: one request per :data:`PARSE_JOBS_PER_REQUEST`
    files, not one per file (a checkout or a first scan changes thousands at once).

    ``batch=False``, or a server without the batch route (older than this supervisor), sends
    them one by one; so does a batch refused for naming another supervisor's file or
    workflow, and each refused file is logged and skipped. Returns whether to batch next time.
    """
    for start in range(0, len(jobs), PARSE_JOBS_PER_REQUEST):
        chunk = jobs[start : start + PARSE_JOBS_PER_REQUEST]
        if len(chunk) > 1 and batch:
            try:
                api.call("POST", "/v1/supervisor/parse-jobs/batch", {"jobs": chunk})
                continue
            except ApiRefused as exc:
                if _not_owner(exc):
                    pass  # find which files, one by one
                elif exc.status in (404, 405):
                    batch = False
                    log.info("the server has no batch parse-job route: queueing files one by one")
                else:
                    raise
        for job in chunk:
            try:
                api.call("POST", "/v1/supervisor/parse-jobs", job)
            except ApiRefused as exc:
                if not _not_owner(exc):
                    raise
                log.warning("definition file %s not queued: %s", job["uri"].split("#")[0], exc)
    return batch
