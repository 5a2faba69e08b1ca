"""LensNet: learned focus. model (network), loss (objective), targets (signed utilities), views (what the
network and its labels see of a document), labels (counterfactual label generation + cache), train,
oracle (true-utility policy), policy (LensPolicy for the engine), focus_eval + commands (CLI)."""
