"""Model families through pluggy: built-ins plus any package in the ``sq_plugin`` entry-point group.

The hook spec (:mod:`.hooks`) lives in the application layer, because its return type (a
:class:`~recipes.speech.contract.SpeechFamily`) does: ``sq_plugin`` stays free of speech models.
It uses the same pluggy project name and entry-point group as ``sq_plugin``'s calibrator hook, so
one plugin module (one ``hookimpl`` marker, one entry point) can add calibrators and families.
Our own manager (not ``sq_plugin``'s) keeps ``stablequant eval`` from importing ModelOpt.
"""

from __future__ import annotations

from pathlib import Path

import pluggy
from torch import nn

from .contract import SpeechFamily, SpeechModel
from .hooks import PROJECT, SpeechFamilySpec, hookimpl  # noqa: F401  (hookimpl: re-exported)

_manager: pluggy.PluginManager | None = None


def family_manager() -> pluggy.PluginManager:
    global _manager
    if _manager is None:
        from . import builtin

        pm = pluggy.PluginManager(PROJECT)
        pm.add_hookspecs(SpeechFamilySpec)
        pm.register(builtin, name="builtin-speech-families")
        pm.load_setuptools_entrypoints(PROJECT)
        _manager = pm
    return _manager


def register_family_plugin(plugin: object, name: str | None = None) -> None:
    """Register a plugin object/module without packaging (same hook as entry points)."""
    family_manager().register(plugin, name=name)


def unregister_family_plugin(plugin: object) -> None:
    family_manager().unregister(plugin)


def families() -> list[SpeechFamily]:
    """Every registered family, plugins before built-ins (pluggy calls later registrations first)."""
    out: list[SpeechFamily] = []
    for found in family_manager().hook.sq_speech_model_families():
        out += list(found or [])
    names = [f.name for f in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"speech model family name(s) registered twice: {sorted(dup)}")
    return out


_by_type: dict[type, SpeechFamily] = {}


def family_of(model: nn.Module | SpeechModel) -> SpeechFamily:
    """The family that runs this module (error naming its type if none does)."""
    if isinstance(model, SpeechModel):
        model = model.model
    cached = _by_type.get(type(model))
    if cached is not None and cached in families():
        return cached
    for family in families():
        if family.claims_module(model):
            _by_type[type(model)] = family
            return family
    raise ValueError(f"no speech model family handles a {type(model).__module__}.{type(model).__name__}; "
                     f"known families: {', '.join(f.name for f in families())}")


def family_named(name: str) -> SpeechFamily:
    for family in families():
        if family.name == name:
            return family
    raise ValueError(f"unknown speech model family {name!r}; known: {', '.join(f.name for f in families())}")


def load_speech_model(path: str | Path) -> SpeechModel:
    """Load a model file/directory with the first family that claims it."""
    path = Path(path)
    for family in families():
        if family.claims_path(path):
            sm = family.load(path)
            sm.family = sm.family or family.name
            return sm
    formats = "; ".join(f"{f.name}: {f.description}" for f in families() if f.description)
    if not path.exists():
        raise FileNotFoundError(f"unknown model {str(path)!r}: not 'demo' and not a model file or directory "
                                f"({formats})")
    raise FileNotFoundError(f"{path}: not a model any family reads ({formats})")


def wrap_speech_model(model: nn.Module, processor=None) -> SpeechModel:
    """A SpeechModel around an in-memory model (its family says what ``processor`` must be)."""
    family = family_of(model)
    sm = family.wrap(model, processor)
    sm.family = sm.family or family.name
    return sm
