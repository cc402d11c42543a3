"""The calibrator registry: one pluggy plugin manager, filled lazily.

Entry points are loaded on first use, not at import, so ``import sq_plugin`` stays cheap and a
broken third-party plugin only fails the look-up that needs it, with its name in the error.
"""

from __future__ import annotations

import pluggy

from .hookspecs import PROJECT, CalibratorSpec

_manager: pluggy.PluginManager | None = None


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager with built-ins and installed entry points registered."""
    global _manager
    if _manager is None:
        import calibrators.plugin

        pm = pluggy.PluginManager(PROJECT)
        pm.add_hookspecs(CalibratorSpec)
        pm.register(calibrators.plugin, name="builtin")
        pm.load_setuptools_entrypoints(PROJECT)
        _manager = pm
    return _manager


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Register a plugin object/module programmatically (same hook as entry points)."""
    plugin_manager().register(plugin, name=name)


def unregister_plugin(plugin: object) -> None:
    plugin_manager().unregister(plugin)


def calibrator_classes() -> dict[str, type]:
    """Every registered calibrator by name; a name claimed twice is an error naming both plugins."""
    pm = plugin_manager()
    found: dict[str, tuple[type, str]] = {}
    for impl in pm.hook.sq_register_calibrators.get_hookimpls():
        for name, cls in (impl.function() or {}).items():
            if name in found and found[name][0] is not cls:
                raise ValueError(
                    f"calibrator name {name!r} is registered by both plugin "
                    f"{found[name][1]!r} and plugin {impl.plugin_name!r}"
                )
            found[name] = (cls, impl.plugin_name)
    return {name: cls for name, (cls, _) in sorted(found.items())}


def calibrator_names() -> list[str]:
    """Names accepted by :func:`calibrator` (built-ins and installed plugins)."""
    return list(calibrator_classes())


def calibrator_class(name: str) -> type:
    classes = calibrator_classes()
    if name not in classes:
        raise ValueError(
            f"unknown calibrator {name!r}; known calibrators: {', '.join(classes) or '(none)'}"
        )
    return classes[name]


def calibrator(name: str, **kwargs) -> tuple[type, tuple, dict]:
    """A ModelOpt constructor tuple ``(cls, args, kwargs)`` for a quantizer's ``"calibrator"`` field.

    The quantizer's own ``num_bits``/``unsigned`` reach the calibrator through the patch in
    :mod:`sq_plugin.algorithm`, so they are not part of ``kwargs``.
    """
    return (calibrator_class(name), (), dict(kwargs))
