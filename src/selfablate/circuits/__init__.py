"""Circuits: the IOI task, edge patching, ACDC / EAP / EAP-IG, and the `selfablate circuits` run."""
