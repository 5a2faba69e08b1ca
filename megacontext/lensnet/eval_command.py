"""Registers ``megacontext eval focus`` (implementation in :mod:`megacontext.lensnet.commands`)."""

from megacontext.lensnet.commands import register_eval as register  # noqa: F401
