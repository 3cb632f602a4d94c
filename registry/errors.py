"""The exceptions of the `registry` package; callers catch `RegistryError` for all of them.

Our exception hierarchy:

* RegistryError
  + InvalidModelFile   - a file is not a valid GGUF/ONNX model (which file, and why)
  + ModelNotFound      - no installed model has that alias
  + ModelInUse         - the model is loaded, so it cannot be removed or replaced
  + NoSourceAvailable  - nowhere to fetch a variant from (offline, no mirror, no catalog entry)
  + IntegrityError     - content does not match its expected sha256
  + NoVariantFits      - selection: no variant fits this device and policy
  + PolicyError        - a policy file is invalid
  + CatalogError       - the built-in catalog is invalid (registry.catalog)
  + AliasConflict      - an alias already names another file (registry.service)

Every message is one line that a person can act on; it is what the CLI prints.
"""

from __future__ import annotations

__all__ = [
    "IntegrityError",
    "InvalidModelFile",
    "ModelInUse",
    "ModelNotFound",
    "NoSourceAvailable",
    "NoSpace",
    "NoVariantFits",
    "PolicyError",
    "RegistryError",
]


class RegistryError(Exception):
    """Base class of every error the registry raises on purpose."""


class InvalidModelFile(RegistryError):
    """The file is not a valid GGUF or ONNX model."""


class ModelNotFound(RegistryError):
    """No installed model has the requested alias."""


class ModelInUse(RegistryError):
    """The model is loaded by a running agent."""


class NoSourceAvailable(RegistryError):
    """No source can provide the requested variant."""


class IntegrityError(RegistryError):
    """Content does not hash to the sha256 it was expected to have."""


class NoSpace(RegistryError):
    """The store's file system has no room for the content (nothing was recorded)."""


class NoVariantFits(RegistryError):
    """No variant of the model fits this device under the active policy."""


class PolicyError(RegistryError):
    """A policy file is invalid."""
