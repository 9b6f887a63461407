"""fastddpm: Denoising Diffusion Probabilistic Models with the sampling hot path in Triton."""
import importlib
import importlib.machinery
import sys
import types

from .ops import ddim_step, ddpm_step, q_sample, timestep_embedding
from .schedule import NoiseSchedule, make_betas

__version__ = "0.1.0"

# Heavier parts import on first use, so that ``import fastddpm`` stays cheap.
_LAZY = {
    "sample": "sampling",
    "DDPMScheduler": "schedulers",
    "DDIMScheduler": "schedulers",
    "DPMSolverMultistepScheduler": "schedulers",
    "UniPCMultistepScheduler": "schedulers",
    "UNet": "models",
    "MLPDenoiser": "models",
    "create_model": "models",
    "train": "training",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "load_pretrained": "checkpoint",
    "variational_bound": "evaluation",
    "accelerate": "pipelines",
    "AcceleratedPipeline": "pipelines",
    "auto_batch_size": "acceleration",
}



class _Pending(types.ModuleType):
    """Stands in ``sys.modules`` for a submodule not imported yet: the first use of one of its names
    imports it, and every later use goes to the real module (attribute reads, writes and deletes;
    dunder look-ups, which module scanners make, answer without importing it; a package's
    ``__path__`` is found on disk, so that importing one of its submodules works and binding it
    on the package imports the package once)."""

    def _real(self):
        full_name = object.__getattribute__(self, "__name__")
        if sys.modules.get(full_name) is self:
            del sys.modules[full_name]
        return importlib.import_module(full_name)

    def __getattr__(self, name):
        if name == "__path__":  # a package's: where its submodules are, found without importing it
            full_name = object.__getattribute__(self, "__name__")
            parent, _, _ = full_name.rpartition(".")
            spec = importlib.machinery.PathFinder.find_spec(full_name, sys.modules[parent].__path__)
            if spec is None or spec.submodule_search_locations is None:
                raise AttributeError(name)
            return list(spec.submodule_search_locations)
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return getattr(self._real(), name)

    def __setattr__(self, name, value):
        setattr(self._real(), name, value)

    def __delattr__(self, name):
        delattr(self._real(), name)

    def __dir__(self):
        return dir(self._real())


class _AlreadyLoaded:
    """The loader of a submodule the real package imported already: hands the import system that
    module instead of executing its file again (a second copy would define its classes twice)."""

    def __init__(self, module):
        self.module, self.spec = module, module.__spec__

    def create_module(self, spec):
        return self.module

    def exec_module(self, module):
        module.__spec__ = self.spec  # the import system set the stand-in spec on it: put the real one back


class _PendingSubmodules:
    """Meta path finder for ``import fastddpm.schedulers.<x>`` while ``fastddpm.schedulers`` is a
    stand-in: the import system has already taken the stand-in as the parent, so the real package is
    imported here (it imports its submodules) and the submodule it loaded is returned."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        parent = sys.modules.get(name.rpartition(".")[0])
        if not isinstance(parent, _Pending):
            return None
        parent._real()
        module = sys.modules.get(name)
        if module is None or getattr(module, "__spec__", None) is None:
            return None  # not one the package imports: the usual finders, on the real package's path
        # Out of sys.modules until the import system puts it back: finding it there, it would take the
        # module's own spec and execute the file again.
        del sys.modules[name]
        return importlib.machinery.ModuleSpec(name, _AlreadyLoaded(module), origin=module.__spec__.origin)


def _register_lazily(name: str) -> None:
    """Put ``fastddpm.<name>`` in ``sys.modules`` now, to be imported on first use.

    diffusers loads a pipeline component recorded as ``["fastddpm.schedulers", "DDPMScheduler"]``
    only from a module already in ``sys.modules`` (it never imports a module a repository names), so
    after ``import fastddpm`` alone a saved pipeline with our scheduler must find it there; importing
    it for real would import diffusers on every ``import fastddpm``."""
    full_name = f"{__name__}.{name}"
    if full_name not in sys.modules:
        sys.modules[full_name] = _Pending(full_name)


# Submodules registered so (diffusers looks for them in sys.modules).
_PENDING = ("schedulers",)
if not any(isinstance(finder, _PendingSubmodules) for finder in sys.meta_path):
    sys.meta_path.insert(0, _PendingSubmodules())
for _name in _PENDING:
    _register_lazily(_name)
del _name

__all__ = ["NoiseSchedule", "make_betas", "q_sample", "ddpm_step", "ddim_step", "timestep_embedding", *_LAZY]


def __dir__():
    """The module's names, the lazily imported ones (``sample``, ``DDPMScheduler``, ...) included."""
    return sorted(set(globals()) | set(_LAZY))


def _submodule(name: str):
    """``fastddpm.<name>``, imported: the real module, never a sys.modules stand-in."""
    pending = sys.modules.get(f"{__name__}.{name}")
    return pending._real() if isinstance(pending, _Pending) else importlib.import_module(f".{name}", __name__)


def __getattr__(name):
    if name in _PENDING:
        return _submodule(name)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastddpm' has no attribute {name!r}")
    value = getattr(_submodule(module), name)
    globals()[name] = value
    return value
