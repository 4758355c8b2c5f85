"""A griffe extension (mkdocs.yml, mkdocstrings' `extensions`): the objects it is given
are read by inspection, importing them, instead of from the source.

mkdocstrings reads fastreg's sources statically, without importing it. That cannot see a
docstring set at import time: ``fastreg.channel.dropout1d/2d/3d`` are made by a factory
(``_channel_dropout``) that sets their name and docstring, and read statically they are
attributes without one. For those alone the module is imported (which imports torch;
without the compiled extension fastreg runs its reference backend) and the inspected
function, with its signature and docstring, replaces the static attribute.
"""

import sys

import griffe


class RuntimeDocstrings(griffe.Extension):
    def __init__(self, objects=()):
        super().__init__()
        self.objects = list(objects)

    def on_package(self, *, pkg, loader, **kwargs):
        for path in self.objects:
            if not path.startswith(pkg.path + "."):
                continue
            module_path, name = path.rsplit(".", 1)
            module = (
                pkg.get_member(module_path[len(pkg.path) + 1 :]) if module_path != pkg.path else pkg
            )
            # griffe imports with sys.path replaced by import_paths: the package's folder,
            # then this interpreter's path (where torch is)
            root = module.filepath.parents[len(module_path.split(".")) - 1]
            inspected = griffe.inspect(
                module_path,
                filepath=module.filepath,
                import_paths=[str(root), *sys.path],
                docstring_parser=loader.docstring_parser,
                docstring_options=loader.docstring_options,
            )
            if not inspected[name].docstring:
                raise ValueError(f"{path}: no docstring at run time either")
            module.set_member(name, inspected[name])
