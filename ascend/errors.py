"""Exceptions of the device layer."""


class DeviceError(RuntimeError):
    """A device cannot be used as asked. The message says why and what to do about it."""
