"""`kubemaas-operator run`: start kopf with the handlers and the settings loaded once."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

import kopf

from kubemaas_operator.settings import OperatorSettings

M_ARENA_MAX = -8  # glibc mallopt(3)


def cap_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives threads their own malloc arenas (up to 8 per core), and the fragments of
    each add up to resident memory; the pool's threads mostly wait on the API server, so two
    arenas serve them. Set before the pool's threads start; a libc without mallopt is left as is."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        pass


def run_operator(settings: OperatorSettings) -> None:
    cap_malloc_arenas()
    kopf.configure(
        log_format=kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.PLAIN,
        verbose=settings.verbose,
    )
    if not settings.verbose:
        # kopf logs every event handler's success at INFO: thousands of lines per minute
        # with pods changing. Keep warnings and errors; our own module logs what we change.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    logging.getLogger("kubemaas_operator").setLevel(logging.INFO)
    from kubemaas_operator import handlers  # noqa: F401  (registers the handlers)

    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
    kopf.run(
        standalone=True,  # one replica, no peering CRDs needed
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        liveness_endpoint=liveness,
        memo=kopf.Memo(settings=settings),
    )
