"""Hydra finds launchers only in the hydra_plugins namespace: this is `hydra/launcher=ray`'s entry there, a shim
over runners.ray_launcher (imported when a sweep uses it, so a machine without Ray never imports Ray)."""
