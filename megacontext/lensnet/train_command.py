"""Registers ``megacontext train lensnet`` (implementation in :mod:`megacontext.lensnet.commands`)."""

from megacontext.lensnet.commands import register_train as register  # noqa: F401
