"""LensNet: learned focus. :mod:`.model` (network), :mod:`.loss` (objective), :mod:`.targets` (signed
utilities), :mod:`.views` (what the network and its labels see of a document), :mod:`.labels`
(counterfactual label generation + cache), :mod:`.train` (training loop), :mod:`.runs` (``train lensnet``:
labels then training). The engine-facing policy and the focus evaluation live in :mod:`megacontext.focus`."""
