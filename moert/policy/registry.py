"""The registry behind ``moert simulate --policy EVICT[+PREFETCH]``: name -> policy class.

A class says where it may stand (``roles``) and builds itself from the name's argument
(``Policy.from_spec``: ``utility:2`` -> ``"2"``). :func:`moert.policy.register` adds one.
"""

from __future__ import annotations

from typing import Any

from moert.policy.base import ROLES, Policy
from moert.policy.combine import Combination

__all__ = ["REGISTRY", "Registry"]


class Registry:
    """Policy classes by name, in registration order."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Policy]] = {}

    def register(self, name: str, cls: type[Policy]) -> None:
        """Makes ``name`` (``name:ARG`` too, when the class takes an argument) build ``cls``."""
        if not (isinstance(cls, type) and issubclass(cls, Policy)):
            raise ValueError(f"register({name!r}, ...): {cls!r} is not a moert.policy.Policy subclass")
        if not set(cls.roles) <= set(ROLES) or not cls.roles:
            raise ValueError(f"register({name!r}, ...): {cls.__name__}.roles must be a subset of {ROLES}")
        self._classes[name] = cls

    def __contains__(self, spec: str) -> bool:
        return spec.partition(":")[0] in self._classes

    def runtime_names(self) -> list[str]:
        """Eviction names a model can run (the classes that are not ``offline``)."""
        return [name for name, cls in self._classes.items() if "evict" in cls.roles and not cls.offline]

    def names(self, role: str, *, verify_passes: bool = False) -> list[str]:
        """Registered names usable as ``role`` (with their argument, e.g. ``utility[:m]``, ``learned[:next]``)."""
        return [
            name + (cls.arg_help if role == "prefetch" else cls.evict_arg_help)
            for name, cls in self._classes.items()
            if role in cls.roles and (cls.verify_passes or not verify_passes)
        ]

    def build(self, spec: str, role: str = "evict", **options: Any) -> Policy:
        """A fresh policy for ``spec`` (``NAME`` or ``NAME:ARG``) in ``role`` (``evict`` or ``prefetch``).

        Raises:
            ValueError: unknown name, a name that cannot take that role, or a bad argument.
        """
        if role not in ROLES:
            raise ValueError(f"role={role!r} must be one of {ROLES}")
        base, colon, arg = spec.partition(":")
        cls = self._classes.get(base)
        if cls is None or role not in cls.roles:
            what = "eviction policy" if role == "evict" else "prefetcher"
            hint = "" if role == "evict" else " (or moert.policy.register(name, cls))"
            raise ValueError(f"unknown {what} {spec!r}; use one of {', '.join(self.names(role))}{hint}")
        if role == "evict" and colon and not cls.evict_arg_help:
            raise ValueError(f"eviction policy {spec!r} takes no ':' argument; use {base!r}")
        policy = cls.from_spec(arg if colon else None, role=role, **options)
        if role == "prefetch" and colon:
            policy.name = spec
        return policy

    def combination(self, evict: str, prefetch: str | None = None, **options: Any) -> Policy:
        """``EVICT[+PREFETCH]`` as one policy (the eviction policy alone without a prefetcher)."""
        e = self.build(evict, "evict", **options)
        return e if prefetch is None else Combination(e, self.build(prefetch, "prefetch", **options))


#: the registry of ``moert.policy`` (filled by its ``register`` lines)
REGISTRY = Registry()
