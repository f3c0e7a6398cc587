"""The registry of device types: type name -> Device class.

Built-in types are listed here, in one place (no registration by import side
effect). Users add their own network functions with :func:`register`.
"""

from __future__ import annotations

from dva.nf.base import Device
from dva.nf.dhcp import Dhcp
from dva.nf.firewall import Firewall
from dva.nf.lb import Lb
from dva.nf.nat import Nat
from dva.nf.policer import Policer
from dva.nf.router import Router
from dva.nf.switch import Switch
from dva.nf.vxlan import Vxlan

_BUILTIN: dict[str, type[Device]] = {
    Switch.type_name: Switch,
    Router.type_name: Router,
    Firewall.type_name: Firewall,
    Nat.type_name: Nat,
    Lb.type_name: Lb,
    Policer.type_name: Policer,
    Dhcp.type_name: Dhcp,
    Vxlan.type_name: Vxlan,
}
_types: dict[str, type[Device]] = dict(_BUILTIN)


def register(cls: type[Device]) -> type[Device]:
    """Make a user device type available to appliance files (usable as a decorator)."""
    name = getattr(cls, "type_name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} has no type_name")
    if name in _types and _types[name] is not cls:
        raise ValueError(f"device type {name!r} is already registered")
    _types[name] = cls
    return cls


def get(name: str) -> type[Device] | None:
    return _types.get(name)


def names() -> list[str]:
    return sorted(_types)
