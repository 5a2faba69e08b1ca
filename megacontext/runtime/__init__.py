"""The runtime loop: the engine that streams tokens through the tree, the working context and the frozen
base model (:mod:`.engine`), token sampling (:mod:`.sampling`), per-step telemetry (:mod:`.telemetry`) and
the focus map drawn from it (:mod:`.viz`)."""
