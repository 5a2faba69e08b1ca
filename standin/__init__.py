"""Stand-in base v2: the recipe that trains MegaContext's small frozen base model and evaluates it.

Outside the ``megacontext`` package on purpose: the package never trains its base. Modules:
``corpus`` (token sources), ``grammar`` (recall content, train vs eval), ``curriculum`` (training rows),
``checkpoint`` (weights, optimizer state, export parts), ``pretrain`` (the training run), ``evaluate``
(probes and the report), ``targets`` (issue 15's targets), ``stage_data`` (what a GPU call carries).
See standin/README.md for the commands.
"""
