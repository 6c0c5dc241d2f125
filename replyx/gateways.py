"""Which gateways a deployment runs: their names and ports, from REPLYX_GATEWAYS and GATEWAY_PORT.

Gateway ``i`` of ``N`` (from 1) listens on ``GATEWAY_PORT + i - 1`` and is named
``gateway-i``, or ``gateway`` when N is 1: the names supervisord, the log files,
``replyx check`` and the metrics use. ``REPLYX_GATEWAY_NAME`` overrides a process's
own name (a gateway on another host).
"""

from __future__ import annotations

from replyx.settings import Settings


def gateway_names(settings: Settings) -> list[str]:
    """The gateways ``replyx run`` starts, as supervisord and their log files name them."""
    if settings.gateways == 1:
        return ["gateway"]
    return [f"gateway-{i}" for i in range(1, settings.gateways + 1)]


def gateway_ports(settings: Settings) -> list[int]:
    """Their ports, in the order of :func:`gateway_names`."""
    return [settings.gateway_port + i for i in range(settings.gateways)]


def gateway_name(settings: Settings) -> str:
    """This gateway's name: ``REPLYX_GATEWAY_NAME``, else from its instance number."""
    return settings.gateway_name_env or gateway_names(settings)[settings.gateway_instance - 1]


def listen_port(settings: Settings) -> int:
    """The port this gateway listens on: its instance's in ``GATEWAY_PORT..+N-1``."""
    return gateway_ports(settings)[settings.gateway_instance - 1]
