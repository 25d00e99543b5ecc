"""`python -m server`: validate the settings, then become the gunicorn master.

Gunicorn reads a few of the same environment variables itself (WEB_CONCURRENCY,
FORWARDED_ALLOW_IPS) and fails on a bad one with a message that does not name it, or a
traceback. Checking everything here first gives one clear line naming the variable; the
`exec` keeps gunicorn as the same process (PID 1 in the container), so signals reach it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from server.logs import log_startup_error
from server.settings import EX_CONFIG, SettingsError, load_settings

CONFIG = Path(__file__).with_name("gunicorn_conf.py")


def main() -> None:
    try:
        load_settings()
    except SettingsError as error:
        log_startup_error(str(error), logger="server.settings")
        sys.exit(EX_CONFIG)
    # Empty means "derive from the CPU quota" to us (as in .env.example), but gunicorn
    # evaluates int(WEB_CONCURRENCY) on import and would die on it: the config file sets
    # the worker count anyway.
    if not os.environ.get("WEB_CONCURRENCY", "unset").strip():
        del os.environ["WEB_CONCURRENCY"]
    gunicorn = Path(sys.executable).with_name("gunicorn")
    os.execv(gunicorn, [str(gunicorn), "--config", str(CONFIG), *sys.argv[1:]])  # noqa: S606


if __name__ == "__main__":
    main()
