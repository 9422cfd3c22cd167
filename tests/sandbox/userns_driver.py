"""Run one sandbox as a non-root supervisor and print what happened (used by test_userns).

``python -I userns_driver.py MODE WORKROOT PROBE`` must run as an unprivileged uid: the backend
then has to use a user namespace. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys

from privsep.sandbox import Limits, ProcessBackend, SandboxSpec, SandboxUnavailable


def main() -> None:
    mode, workroot, probe = sys.argv[1], sys.argv[2], sys.argv[3]
    try:
        backend = ProcessBackend(launch_mode=mode, log_dir=workroot)  # type: ignore[arg-type]
    except SandboxUnavailable as exc:
        print(json.dumps({"unavailable": str(exc)}))
        return
    with backend:
        spec = SandboxSpec(
            kind="task",
            entry_point="privsep.sandbox.entrypoints:run_path",
            argv=(probe, "ids"),
            workdir=os.path.join(workroot, f"work-{mode}"),
            bundle_paths=(os.path.dirname(probe),),
            limits=Limits(wall_seconds=30),
        )
        handle = backend.launch(spec)
        status = handle.wait(60)
        print(
            json.dumps(
                {
                    "supervisor_uid": os.geteuid(),
                    "userns": backend.userns,
                    "describe": backend.describe(),
                    "reason": status.reason.value if status else None,
                    "detail": status.detail if status else None,
                    "log": handle.output().text,
                }
            )
        )


main()
