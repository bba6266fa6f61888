"""Neuron-to-Graph explanations of units and the mask explorer (`selfablate explain`)."""
