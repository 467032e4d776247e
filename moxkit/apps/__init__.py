"""Applications built on the tool: tiny models and data made from a config, the tofu-mini and
known-facts tasks, the packaged real model, the selection rule, the demo and the sweep. Nothing
in the engine, train/ or eval/ imports from here."""
