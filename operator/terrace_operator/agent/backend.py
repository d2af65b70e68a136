"""The GPU backends the agent drives: real NVML, or the fake in `fake.py`.

Both speak NVML's units (milliwatts, millijoules) and raise the errors below,
so the agent's logic is the same for both. Only this module imports pynvml,
and only when the NVML backend is constructed.
"""

from __future__ import annotations

import contextlib
from typing import Protocol


class BackendError(Exception):
    """A GPU call failed."""


class NeedsReinit(BackendError):
    """The driver went away or was reloaded: re-initialise, then re-apply."""


class NotSupported(BackendError):
    pass


class NoPermission(BackendError):
    pass


class GpuBackend(Protocol):
    def init(self) -> None: ...
    def shutdown(self) -> None: ...
    def device_count(self) -> int: ...
    def name(self, index: int) -> str: ...
    def uuid(self, index: int) -> str: ...
    def power_limit_constraints_mw(self, index: int) -> tuple[int, int]: ...
    def default_power_limit_mw(self, index: int) -> int: ...
    def enforced_power_limit_mw(self, index: int) -> int: ...
    def set_power_limit_mw(self, index: int, milliwatts: int) -> None: ...
    def power_usage_mw(self, index: int) -> int: ...
    def total_energy_mj(self, index: int) -> int: ...
    def utilization_percent(self, index: int) -> int: ...


class NvmlBackend:
    """nvidia-ml-py, unchanged units. Setting a limit needs root/SYS_ADMIN."""

    def __init__(self) -> None:
        import pynvml  # imported here: the operator and the fake never need it

        self._nvml = pynvml
        self._handles: dict[int, object] = {}

    def _call(self, fn, *args):
        n = self._nvml
        try:
            return fn(*args)
        except (
            n.NVMLError_Uninitialized,
            n.NVMLError_DriverNotLoaded,
            n.NVMLError_GpuIsLost,
            n.NVMLError_ResetRequired,
        ) as exc:
            self._handles.clear()
            raise NeedsReinit(str(exc)) from exc
        except n.NVMLError_NotSupported as exc:
            raise NotSupported(str(exc)) from exc
        except n.NVMLError_NoPermission as exc:
            raise NoPermission(str(exc)) from exc
        except n.NVMLError as exc:
            raise BackendError(str(exc)) from exc

    def _h(self, index: int):
        if index not in self._handles:
            self._handles[index] = self._call(self._nvml.nvmlDeviceGetHandleByIndex, index)
        return self._handles[index]

    def init(self) -> None:
        self._handles.clear()
        self._call(self._nvml.nvmlInit)

    def shutdown(self) -> None:
        self._handles.clear()
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()

    def device_count(self) -> int:
        return int(self._call(self._nvml.nvmlDeviceGetCount))

    def name(self, index: int) -> str:
        v = self._call(self._nvml.nvmlDeviceGetName, self._h(index))
        return v.decode() if isinstance(v, bytes) else str(v)

    def uuid(self, index: int) -> str:
        v = self._call(self._nvml.nvmlDeviceGetUUID, self._h(index))
        return v.decode() if isinstance(v, bytes) else str(v)

    def power_limit_constraints_mw(self, index: int) -> tuple[int, int]:
        lo, hi = self._call(self._nvml.nvmlDeviceGetPowerManagementLimitConstraints, self._h(index))
        return int(lo), int(hi)

    def default_power_limit_mw(self, index: int) -> int:
        return int(self._call(self._nvml.nvmlDeviceGetPowerManagementDefaultLimit, self._h(index)))

    def enforced_power_limit_mw(self, index: int) -> int:
        return int(self._call(self._nvml.nvmlDeviceGetEnforcedPowerLimit, self._h(index)))

    def set_power_limit_mw(self, index: int, milliwatts: int) -> None:
        self._call(self._nvml.nvmlDeviceSetPowerManagementLimit, self._h(index), int(milliwatts))

    def power_usage_mw(self, index: int) -> int:
        return int(self._call(self._nvml.nvmlDeviceGetPowerUsage, self._h(index)))

    def total_energy_mj(self, index: int) -> int:
        return int(self._call(self._nvml.nvmlDeviceGetTotalEnergyConsumption, self._h(index)))

    def utilization_percent(self, index: int) -> int:
        return int(self._call(self._nvml.nvmlDeviceGetUtilizationRates, self._h(index)).gpu)
