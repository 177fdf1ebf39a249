"""Engine integrations: thin layers that hand MoE layer handles to the core and feed it adapter rows."""
