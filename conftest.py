"""pytest setup for the project root.

The root ``__init__.py`` is the ComfyUI entry point: ComfyUI imports it as a package named after its
folder. pytest would import it too (as the package holding ``tests/``), under a name derived from
whatever the clone's folder is called, where its relative imports fail. Collect the root as a plain
directory instead; the node tests import the pack themselves, the way ComfyUI does.
"""

import pytest


class _RootAsPlainDirectory:
    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if path == parent.config.rootpath:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    # Registered as a global plugin: a conftest's own hooks are not consulted for its own folder.
    config.pluginmanager.register(_RootAsPlainDirectory(), "diffdis-root-as-plain-directory")
