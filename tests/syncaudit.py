"""Audit what a runner's launched path asks of the device, on a CPU, by running it on `meta`.

On the `meta` device tensors have shapes but no data, so every place where the host would
wait for the device shows up as an operation that needs data: a scalar read (`.item()`,
`bool(t)`, `int(t)`), a data-dependent shape (`nonzero`), a device->host copy (`.cpu()`,
`.tolist()`, `.numpy()`). `DeviceAudit` records, in order, every such event, every
host->device copy (including `torch.tensor(..., device=...)`, which builds on the host and
copies), every operation that mixes a host tensor into device work, and the device's own
compute. It answers data reads with placeholders (zeros; True for a boolean) so the code
under audit runs to its end, as it would on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
_DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_consecutive.default}
_HOST_BUILDERS = {torch.tensor, torch.as_tensor}
# bool(t) reaches the dispatcher as is_nonzero, t.item() as item (under inference mode they are
# not decomposed first), both as _local_scalar_dense otherwise.
_SCALAR_READS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default}


@dataclass
class Event:
    kind: str  # "h2d", "d2h", "sync", "mixed", "compute"
    op: str


def _tensors(obj: Any) -> list[torch.Tensor]:
    flat, _ = tree_flatten(obj)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _dev(t: torch.Tensor) -> str:
    return t.device.type


@dataclass
class DeviceAudit:
    device: str = "meta"
    events: list[Event] = field(default_factory=list)

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]

    def index(self, kind: str, last: bool = False) -> int:
        idx = [i for i, e in enumerate(self.events) if e.kind == kind]
        if not idx:
            return -1
        return idx[-1] if last else idx[0]

    def __enter__(self) -> "DeviceAudit":
        self._fn = _FunctionAudit(self)
        self._dispatch = _DispatchAudit(self)
        self._fn.__enter__()
        self._dispatch.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._dispatch.__exit__(*exc)
        self._fn.__exit__(*exc)


class _FunctionAudit(TorchFunctionMode):
    """Sees `torch.tensor(data, device=...)`, which never reaches the dispatcher as a copy."""

    def __init__(self, audit: DeviceAudit) -> None:
        super().__init__()
        self.audit = audit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_BUILDERS:
            dev = kwargs.get("device")
            if dev is not None and torch.device(dev).type == self.audit.device:
                self.audit.events.append(Event("h2d", f"{func.__name__}(..., device={dev})"))
        return func(*args, **kwargs)


def _target_device(args: tuple, kwargs: dict) -> str | None:
    """The device a `_to_copy` / `to` call moves to, if it names one."""
    if kwargs.get("device") is not None:
        return torch.device(kwargs["device"]).type
    for a in args[1:]:
        if isinstance(a, (torch.device, str)):
            return torch.device(a).type
        if isinstance(a, torch.Tensor):  # to(other)
            return _dev(a)
    return None


class _DispatchAudit(TorchDispatchMode):
    def __init__(self, audit: DeviceAudit) -> None:
        super().__init__()
        self.audit = audit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = self.audit.device
        record = self.audit.events.append
        ins = _tensors((args, kwargs))
        on_dev = [t for t in ins if _dev(t) == dev]
        on_host = [t for t in ins if _dev(t) == "cpu" and t.dim() > 0]
        name = str(func)
        if func in _SCALAR_READS and on_dev:
            record(Event("sync", name))
            return True if args[0].dtype == torch.bool else 0
        if func in _DATA_DEPENDENT and on_dev:
            record(Event("sync", name))
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            if _dev(dst) == "cpu" and _dev(src) == dev:
                record(Event("d2h", name))
                return dst.zero_()
            if _dev(dst) == dev and _dev(src) == "cpu":
                record(Event("h2d", name))
                return func(*args, **kwargs)
        if func is aten._to_copy.default or func.overloadpacket is aten.to:
            src = args[0]
            target = _target_device(args, kwargs)
            target = target if target is not None else _dev(src)
            if _dev(src) == dev and target == "cpu":
                record(Event("d2h", name))
                return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype)
            if _dev(src) == "cpu" and target == dev:
                record(Event("h2d", name))
                return func(*args, **kwargs)
        if on_dev and on_host:
            record(Event("mixed", name))
        elif on_dev or kwargs.get("device") is not None and torch.device(kwargs["device"]).type == dev:
            record(Event("compute", name))
        return func(*args, **kwargs)
